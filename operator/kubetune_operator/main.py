"""`kubetune operator`: the kopf operator process."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import structlog


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="kubetune operator")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=None,
                       help="watch this namespace (repeatable); default: KUBETUNE_NAMESPACES")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (cluster-wide)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster or "
                                                           "$KUBECONFIG)")
    parser.add_argument("--health-port", type=int, default=None)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--bind", default="0.0.0.0", help="address of /healthz and /metrics")
    parser.add_argument("--leader-elect", action="store_true", default=None,
                        help="active/standby: act only while holding a Lease (run 2 replicas)")
    parser.add_argument("--leader-election-namespace", default=None,
                        help="namespace of the Lease (default: $POD_NAMESPACE or default)")
    parser.add_argument("--leader-election-name", default=None,
                        help="name of the Lease (default: kubetune-operator)")
    parser.add_argument("--json-logs", action="store_true", default=None)
    return parser


def api_client(settings):
    """The API client every worker shares: in-cluster credentials, else $KUBECONFIG. Its pool
    holds a connection per worker that may call the API at once (the client's default, five
    per CPU, is smaller than the workers on a small node: each request past it would open,
    and pay a TLS handshake for, a connection it then throws away)."""
    from kubernetes import client as kclient
    from kubernetes import config

    from .controller import CREATES_AT_ONCE

    configuration = kclient.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                client_configuration=configuration)
    configuration.connection_pool_maxsize = (CREATES_AT_ONCE * settings.finetunejob_workers
                                             + settings.adapter_workers + 8)
    return kclient.ApiClient(configuration)


def run(args: argparse.Namespace) -> int:
    import kopf
    from pydantic import ValidationError

    from . import gctuning, logs, metrics
    from .cache import Caches, job_view, trainer_pod_view
    from .controller import FineTuneJobController
    from .adapters import LoRAAdapterController
    from .handlers import finetunejob as ftj_handlers
    from .handlers import NoDiffBase, registered_only_event_handlers
    from .handlers import loraadapter as adapter_handlers
    from .kube import Kube
    from .settings import OperatorSettings

    logs.configure(args.json_logs)
    log = structlog.get_logger("kubetune.operator")
    try:
        overrides = {k: v for k, v in {
            "namespaces": args.namespace, "health_port": args.health_port,
            "metrics_port": args.metrics_port, "leader_election": args.leader_elect,
            "leader_election_namespace": args.leader_election_namespace,
            "leader_election_name": args.leader_election_name}.items() if v}
        if args.all_namespaces:
            overrides["namespaces"] = []
        settings = OperatorSettings(**overrides)
    except ValidationError as exc:
        print(f"kubetune operator: error: invalid setting: {exc.errors()[0]['loc']}: "
              f"{exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    try:
        api = api_client(settings)
    except Exception as exc:  # noqa: BLE001 - one clear line at start-up
        print(f"kubetune operator: error: no Kubernetes credentials: {exc}", file=sys.stderr)
        return 2

    kube = Kube(api)
    settings = _trainer_rbac(kube, settings, log)
    caches = Caches()
    controller = FineTuneJobController(kube, settings, caches)
    registry = kopf.OperatorRegistry()
    ftj_handlers.register(registry, controller)
    adapters = LoRAAdapterController(kube, settings, caches.finetunejobs)
    controller.listeners.append(adapters.on_finetunejob)
    adapter_handlers.register(registry, adapters)
    if not registered_only_event_handlers(registry):
        raise RuntimeError("a change handler is registered: kopf's diff base is needed again")

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_):
        settings.persistence.finalizer = "kubetune.io/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="kubetune.io")
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.posting.enabled = False  # we post our own, named Events
        settings.execution.max_workers = 8
        settings.watching.server_timeout = 300
        settings.batching.batch_window = 0.02  # react to an event in ~20 ms, not kopf's 100 ms
        # Exact namespaces (or cluster-wide): no need to watch Namespaces or CRDs, which a
        # least-privilege ServiceAccount cannot; glob patterns need the namespace scan.
        if not any(c in ns for ns in controller.settings.namespaces for c in "*?["):
            settings.scanning.disabled = True
        # Prime the child caches before the first reconcile: after a restart, the operator
        # must see existing attempts before it decides to create one.
        import fnmatch

        patterns = controller.settings.namespaces
        exact = [ns for ns in patterns if not any(c in ns for c in "*?[")]
        scopes = [None] if not patterns or len(exact) < len(patterns) else exact

        def watched(namespace: str) -> bool:
            return not patterns or any(fnmatch.fnmatch(namespace, p) for p in patterns)

        # And the serving cache (target Deployments, pods) before the first adapter reconcile.
        adapters.prime(scopes, watched)
        for ns in scopes:
            for kind, store, view in (("Job", caches.jobs, job_view),
                                      ("Pod", caches.pods, trainer_pod_view)):
                for obj in map(view, kube.list(kind, "kubetune.io/finetunejob", ns)):
                    namespace = obj["metadata"]["namespace"]
                    if not watched(namespace):
                        continue
                    owner = (namespace, obj["metadata"]["labels"]["kubetune.io/finetunejob"])
                    store.put(owner, obj)
        gctuning.tune()  # after the caches are primed: what start-up made is never rescanned
        controller.queue.start()
        adapters.queue.start()
        log.info("Started operator", namespaces=controller.settings.namespaces or "all",
                 trainer_rbac=controller.settings.trainer_rbac)

    metrics.serve(settings.metrics_port, args.bind)
    if settings.leader_election:
        _lead(api, settings, args.bind, log)
    logging.getLogger("kopf").setLevel(logging.WARNING)
    kopf.run(registry=registry, clusterwide=not settings.namespaces,
             namespaces=settings.namespaces,
             liveness_endpoint=f"http://{args.bind}:{settings.health_port}/healthz",
             standalone=True)
    kube.flush_events(5.0)  # the last Events (a stop's own) are not lost to the exit
    return 0


def _trainer_rbac(kube, settings, log):
    """Settle `trainer_rbac: auto`: shared when the trainer-status policy is in force."""
    from kubetune.api import trainerstatus

    if settings.trainer_rbac != "auto":
        return settings
    try:
        shared = kube.admission_policy_bound(trainerstatus.NAME)
    except Exception as exc:  # noqa: BLE001 - the safe choice, said once
        log.warning("Could not read the trainer-status admission policy", error=str(exc))
        shared = False
    if not shared:
        log.warning(f"ValidatingAdmissionPolicy {trainerstatus.NAME} and its binding are not "
                    f"installed (or not readable): each trainer gets a Role and RoleBinding of "
                    f"its own")
    return settings.model_copy(update={"trainer_rbac": "shared" if shared else "perJob"})


def _lead(api, settings, bind: str, log) -> None:
    """Wait for the Lease (serving /healthz meanwhile: a standby is healthy), then keep it."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from .leader import LeaderElector

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "8")
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *args):
            pass

    standby = HTTPServer((bind, settings.health_port), Health)
    threading.Thread(target=standby.serve_forever, daemon=True).start()
    namespace = settings.leader_election_namespace or os.environ.get("POD_NAMESPACE") or \
        "default"
    identity = f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{os.getpid()}"
    elector = LeaderElector(api, namespace, settings.leader_election_name, identity,
                            settings.lease_seconds, max(settings.lease_seconds / 5, 0.4))
    elector.acquire()
    standby.shutdown()
    standby.server_close()
    elector.keep()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
