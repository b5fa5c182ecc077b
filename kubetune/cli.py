"""The `kubetune` command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _dev_cluster(args: argparse.Namespace) -> int:
    from .devcluster import toolchain
    from .devcluster.cluster import ADDON_TOOLS, DevCluster

    if args.action == "build":
        from .devcluster import realnode

        if not args.no_real_node:
            realnode.install_requirements(lambda msg: print(msg, file=sys.stderr, flush=True))
        built = toolchain.ensure_built()
        for addon in args.with_ or ():
            for name in ADDON_TOOLS[addon]:
                built[name] = toolchain.ensure_optional(name)
        if "mlflow" in (args.with_ or ()):
            from .devcluster import mlflow

            built["mlflow"] = mlflow.ensure_installed()
        for name, path in built.items():
            print(f"{name}\t{path}", file=sys.stderr if args.quiet else sys.stdout)
        return 0
    images = tuple(i for i in args.images.split(",") if i and i != "none")
    cluster = DevCluster(args.dir, real_node=not args.no_real_node, images=images,
                         addons=tuple(args.with_ or ()))
    if args.action == "images":
        for name, image in cluster.build_images().items():
            print(f"{name}\t{image.name}")
        return 0
    if args.action == "up":
        cluster.up()
        _print_env(cluster.env())
        return 0
    if args.action == "down":
        cluster.down()
        return 0
    if args.action == "env":
        _print_env(cluster.env())
        return 0
    status = cluster.status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0 if status.get("running") else 1


def _print_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if key == "PATH":
            value = value.split(":", 1)[0]
            print(f"export PATH={shlex.quote(value)}:\"$PATH\"")
        else:
            print(f"export {key}={shlex.quote(value)}")


def _print_status(status: dict) -> None:
    if not status.get("processes"):
        print(f"Dev cluster: not running ({status['dir']})")
        return
    state = "running" if status["running"] else "DEGRADED"
    print(f"Dev cluster: {state} ({status['dir']})")
    print(f"  kubeconfig: {status['kubeconfig']}")
    for name, proc in status["processes"].items():
        print(f"  {name:<24} pid {proc['pid']:<8} {'up' if proc['alive'] else 'DOWN'}")
    if "s3" in status:
        print(f"  s3: {status['s3']['endpoint']} (bucket {status['s3']['bucket']})")
    for node in status.get("nodes", []):
        kind = "real: kubelet + containerd" if node.get("real") else "kwok"
        print(f"  node {node['name']:<20} ready={node['ready']!s:<5} gpus={node['gpus']:<3} "
              f"({kind})")
    if "nodes_error" in status:
        print(f"  nodes: {status['nodes_error']}")


def _run(args: argparse.Namespace) -> int:
    try:
        from kubetune_trainer.local import run_local
    except ImportError as exc:
        print(f"kubetune: error: `kubetune run` needs the trainer: pip install "
              f"'kubetune[trainer]' ({exc})", file=sys.stderr)
        return 2
    return run_local(args.finetunejob, args.output, args.runs_dir, args.max_steps, args.quiet,
                     args.verbose)


def _operator(args: argparse.Namespace) -> int:
    from kubetune_operator.main import run

    return run(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        from kubetune_trainer.serve import main as serve_main
    except ImportError as exc:
        print(f"kubetune: error: `kubetune serve` needs the trainer: pip install "
              f"'kubetune[trainer]' ({exc})", file=sys.stderr)
        return 2
    return serve_main(args.serve_args)


def _api(args: argparse.Namespace) -> int:
    try:
        from .openai_api.cli import run
    except ImportError as exc:
        print(f"kubetune: error: `kubetune api` needs the kubernetes client and boto3: pip "
              f"install 'kubetune[operator]' ({exc})", file=sys.stderr)
        return 2
    return run(args)


def _compare(args) -> int:
    try:
        from kubetune_trainer.compare import METHODS, CompareError, compare, table
    except ImportError as exc:
        print(f"kubetune: error: `kubetune compare` needs the trainer: pip install "
              f"'kubetune[trainer]' ({exc})", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods \
        else list(METHODS)
    try:
        records = compare(args.finetunejob, methods, args.output, args.learning_rate,
                          args.max_steps, args.max_samples)
    except CompareError as exc:
        print(f"kubetune: error: {exc}", file=sys.stderr)
        return 2
    print(table(records))
    print(f"\nWrote {args.output}/comparison.md, comparison.json and comparison.png",
          file=sys.stderr)
    return 1 if any("error" in r for r in records) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=(
        "Declarative LLM fine-tuning on Kubernetes: train, verify, serve, promote, roll back."))
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev-cluster", help="a real local control plane, fake GPU nodes and S3")
    dev.add_argument("action", choices=["up", "down", "env", "status", "build", "images"],
                     help="build: binaries and Debian packages; images: the real node's images "
                          "(`up` builds them too)")
    dev.add_argument("--dir", type=Path, default=None,
                     help="cluster folder (default: $XDG_STATE_HOME/kubetune/dev-cluster)")
    dev.add_argument("--json", action="store_true", help="status as JSON")
    dev.add_argument("--quiet", action="store_true", help="build: list binaries on stderr")
    dev.add_argument("--no-real-node", action="store_true",
                     help="up: KWOK nodes only (no kubelet, no images); build: no Debian "
                          "packages for the real node")
    dev.add_argument("--images", default="operator,trainer,serve",
                     help="up: project images (Dockerfile targets) to build and load into the "
                          "real node, comma-separated, or 'none' (default: all three)")
    dev.add_argument("--with", dest="with_", action="append",
                     choices=["kueue", "flux", "mlflow"], default=[],
                     help="up/build: also start/build an add-on (repeatable): kueue = Kueue's controller "
                          "and webhooks with a GPU ClusterQueue and the LocalQueue default/gpus;"
                          " flux = Flux's source- and kustomize-controller and a Git server;"
                          " mlflow = an MLflow tracking server (SQLite; KUBETUNE_MLFLOW_URL)")
    dev.set_defaults(func=_dev_cluster)

    run = sub.add_parser("run", help="run a FineTuneJob on this machine, without a cluster")
    run.add_argument("finetunejob", type=Path, help="FineTuneJob manifest (YAML)")
    run.add_argument("--output", default=None,
                     help="output URI (s3:// or file://); default: the spec's, or a local "
                          "folder when no S3 credentials are set")
    run.add_argument("--runs-dir", type=Path, default=Path("kubetune-runs"),
                     help="where events, summary and the loss curve go (default ./kubetune-runs)")
    run.add_argument("--max-steps", type=int, default=None, help="cap the run (smoke tests)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true",
                     help="show third-party warnings, loading bars and kernel notes")
    run.set_defaults(func=_run)

    cmp = sub.add_parser("compare", help="train a FineTuneJob's data with every method and "
                                         "measure them (score, memory, speed, size)")
    cmp.add_argument("finetunejob", type=Path, help="FineTuneJob manifest (YAML)")
    cmp.add_argument("--methods", default=None,
                     help="comma-separated, from Base,Full,LoRA,DoRA,QLoRA,PrefixTuning,IA3,"
                          "Adapter (default: all)")
    cmp.add_argument("--output", type=Path, default=Path("kubetune-compare"),
                     help="folder for comparison.md/.json/.png (default ./kubetune-compare)")
    cmp.add_argument("--learning-rate", type=float, default=None,
                     help="one learning rate for every method (default: each method's own; "
                          "the job's for its own method)")
    cmp.add_argument("--max-steps", type=int, default=None, help="cap every method's run")
    cmp.add_argument("--max-samples", type=int, default=None,
                     help="score at most this many eval records")
    cmp.set_defaults(func=_compare)

    serve = sub.add_parser("serve", add_help=False,
                           help="OpenAI-compatible server that hot-swaps adapters (vLLM's "
                                "runtime LoRA API); `kubetune serve --help` for options")
    serve.add_argument("serve_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=_serve)

    api = sub.add_parser("api", help="OpenAI-compatible fine-tuning API (files, jobs, events, "
                                     "checkpoints) over FineTuneJobs")
    from .openai_api.cli import add_arguments as api_arguments

    api_arguments(api)
    api.set_defaults(func=_api)

    op = sub.add_parser("operator", help="run the kubetune operator (kopf)")
    try:
        from kubetune_operator.main import build_parser as operator_parser

        operator_parser(op)
    except ImportError:  # the operator extra is not installed
        pass
    op.set_defaults(func=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # every option belongs to the server's own parser
        return _serve(argparse.Namespace(serve_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        if getattr(args, "debug", False):
            raise
        print(f"kubetune: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
