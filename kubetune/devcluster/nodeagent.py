"""The process node agent: a TEST STAND-IN for kubelet + a container runtime.

It registers one Node, keeps its Lease and Ready condition fresh, and runs every pod the real
scheduler binds to that node as local processes:

* the container's ``command``/``args`` with ``$(VAR)`` expansion, ``env``/``envFrom`` (values,
  ConfigMap and Secret keys, downward API fields such as ``status.podIP``) and ``workingDir``;
* volumes (``emptyDir``, ``configMap``, ``secret``, ``downwardAPI``, ``projected`` with
  service-account tokens from the TokenRequest API, ``hostPath``, and ``persistentVolumeClaim``
  as a folder kept per claim) materialised into a folder and bind-mounted at their ``mountPath``
  in a private mount namespace (see ``podexec``);
* init containers in order, then the containers; restart policies ``Never``/``OnFailure``/
  ``Always`` (with back-off); ``httpGet``/``tcpSocket``/``exec`` readiness probes;
* the pod's status written back like a kubelet: phase, conditions, an IP on loopback
  (``127.X.Y.Z``, one per pod), container states with exit code, reason and the termination
  message (``terminationMessagePath``, or the log tail with ``FallbackToLogsOnError``);
* deletion: SIGTERM to the process group, SIGKILL after the grace period, then the final delete.

The image is ignored (the command runs with this machine's interpreters), resource limits and
user IDs are not enforced, and ``kubectl logs`` is not served: logs are files under the agent's
folder (``pods/<namespace>_<name>_<uid>/<container>.log``).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import structlog
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = structlog.get_logger("nodeagent")

KUBELET_VERSION = "v1.35.4-kubetune-process-agent"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$ escapes, others stay."""
    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))
    return _VAR_REF.sub(sub, value)


class PodRun:
    """Owns one pod's processes and status, in its own thread."""

    def __init__(self, agent: "NodeAgent", pod: dict):
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = agent.workdir / "pods" / f"{self.ns}_{self.name}_{self.uid}"
        self.ip = agent.allocate_ip()
        self.delete_event = threading.Event()
        self.gone_event = threading.Event()  # the pod object no longer exists
        self.procs: dict[str, subprocess.Popen] = {}
        self.statuses: dict[str, dict] = {}
        self.ready: dict[str, bool] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self.log = log.bind(pod=f"{self.ns}/{self.name}")

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def request_delete(self) -> None:
        self.delete_event.set()

    def gone(self) -> None:
        self.gone_event.set()
        self.delete_event.set()

    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception as exc:  # noqa: BLE001 - report as a failed pod, like a broken runtime
            self.log.exception("Pod run crashed")
            if not self.gone_event.is_set():
                self._patch_status({"phase": "Failed", "reason": "NodeAgentError",
                                    "message": f"process node agent: {exc}"})
        finally:
            self._kill_all(grace=0)
            self.agent.release_ip(self.ip)
            self.agent.forget(self.uid)

    def _lifecycle(self) -> None:
        spec = self.pod["spec"]
        self.dir.mkdir(parents=True, exist_ok=True)
        start_time = _now()
        try:
            volumes = self._materialise_volumes(spec.get("volumes") or [])
        except Exception as exc:  # noqa: BLE001
            self._patch_status({"phase": "Pending", "conditions": [
                self._cond("PodScheduled", True), self._cond("Initialized", False,
                                                             "VolumeSetupFailed", str(exc))]})
            self.log.warning("Failed to set up volumes", error=str(exc))
            # Retry like a kubelet would until the pod is deleted.
            if self.delete_event.wait(5):
                self._finish_delete()
                return
            return self._lifecycle()

        base_status = {"hostIP": self.agent.host_ip, "hostIPs": [{"ip": self.agent.host_ip}],
                       "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": start_time,
                       "qosClass": "BestEffort"}
        init = spec.get("initContainers") or []
        containers = spec["containers"]
        restart_policy = spec.get("restartPolicy", "Always")
        self._patch_status({**base_status, "phase": "Pending", "conditions": [
            self._cond("PodScheduled", True), self._cond("Initialized", not init),
            self._cond("ContainersReady", False), self._cond("Ready", False)],
            "containerStatuses": [self._waiting(c["name"]) for c in containers],
            **({"initContainerStatuses": [self._waiting(c["name"]) for c in init]} if init else {})})

        # Init containers: in order, each must succeed (retried unless restartPolicy Never).
        for ctr in init:
            while True:
                code = self._run_to_exit(ctr, volumes, init=True)
                if self.delete_event.is_set():
                    return self._finish_delete()
                if code == 0:
                    break
                if restart_policy == "Never":
                    self._patch_status({"phase": "Failed", "initContainerStatuses":
                                        list(self._statuses_for(init))})
                    return self._wait_for_delete()
                time.sleep(1)

        self._patch_status({"conditions": [self._cond("Initialized", True)]})
        threads = [threading.Thread(target=self._container_loop,
                                    args=(c, volumes, restart_policy), daemon=True)
                   for c in containers]
        for thread in threads:
            thread.start()
        self._patch_status({"phase": "Running",
                            "containerStatuses": list(self._statuses_for(containers))})
        self._probe_until_done(containers, threads)
        if self.delete_event.is_set():
            return self._finish_delete()
        codes = [self.statuses[c["name"]]["state"]["terminated"]["exitCode"] for c in containers]
        phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        self._patch_status({"phase": phase, "conditions": [
            self._cond("ContainersReady", False, "PodCompleted"),
            self._cond("Ready", False, "PodCompleted")],
            "containerStatuses": list(self._statuses_for(containers))})
        self.log.info("Pod finished", phase=phase, exit_codes=codes)
        self._wait_for_delete()

    def _wait_for_delete(self) -> None:
        self.delete_event.wait()
        self._finish_delete()

    def _finish_delete(self) -> None:
        self._kill_all(grace=self._grace())
        if self.gone_event.is_set():
            return
        # Like a kubelet: report the terminal phase before the final delete, so controllers
        # waiting on it (the Job controller's tracking finalizer) can let the pod go.
        containers = self.pod["spec"]["containers"]
        for _ in range(50):
            if all("terminated" in (self.statuses.get(c["name"]) or {}).get("state", {})
                   for c in containers if c["name"] in self.statuses):
                break
            time.sleep(0.1)
        codes = [(self.statuses.get(c["name"]) or {}).get("state", {}).get("terminated", {})
                 .get("exitCode", 137) for c in containers]
        phase = "Succeeded" if codes and all(c == 0 for c in codes) else "Failed"
        self._patch_status({"phase": phase, "conditions": [
            self._cond("Ready", False, "PodCompleted"),
            self._cond("ContainersReady", False, "PodCompleted")],
            "containerStatuses": list(self._statuses_for(containers))})
        try:
            self.agent.core.delete_namespaced_pod(
                self.name, self.ns, grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(uid=self.uid)))
            self.log.info("Deleted pod")
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _grace(self) -> int:
        meta = self.agent.current(self.uid) or self.pod
        grace = meta["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return int(grace)

    # ---- containers ------------------------------------------------------------------------
    def _container_loop(self, ctr: dict, volumes: dict, restart_policy: str) -> None:
        backoff = 1.0
        while not self.delete_event.is_set():
            code = self._run_to_exit(ctr, volumes, init=False)
            if self.delete_event.is_set():
                return
            if restart_policy == "Never" or (restart_policy == "OnFailure" and code == 0):
                return
            self.log.info("Restarting container", container=ctr["name"], exit_code=code)
            if self.delete_event.wait(backoff):
                return
            backoff = min(backoff * 2, 30)

    def _run_to_exit(self, ctr: dict, volumes: dict, init: bool) -> int:
        name = ctr["name"]
        prev = self.statuses.get(name)
        restarts = (prev or {}).get("restartCount", -1) + 1
        env = self._container_env(ctr)
        argv = [expand(part, env) for part in (ctr.get("command") or []) + (ctr.get("args") or [])]
        term_file = self.dir / f"{name}.termination-log"
        term_file.write_text("")
        host_paths = {v["name"] for v in self.pod["spec"].get("volumes") or [] if "hostPath" in v}
        mounts = [{"source": str(volumes[m["name"]] / m["subPath"]) if m.get("subPath")
                   else str(volumes[m["name"]]), "target": m["mountPath"],
                   "readOnly": bool(m.get("readOnly")), "hostPath": m["name"] in host_paths}
                  for m in ctr.get("volumeMounts") or []]
        mounts.append({"source": str(term_file),
                       "target": ctr.get("terminationMessagePath", "/dev/termination-log"),
                       "readOnly": False})
        logfile = self.dir / f"{name}.log"
        if not argv:
            code, reason = 128, "ContainerCannotRun"
            message = ("the process node agent needs an explicit command: "
                       "it runs no image entrypoint")
            self._set_terminated(name, restarts, code, reason, message, _now(), prev)
            return code
        spec_file = self.dir / f"{name}.exec.json"
        scratch = self.dir / f"{name}.scratch"  # podexec's private tmpfs for missing targets
        scratch.mkdir(exist_ok=True)
        spec_file.write_text(json.dumps({"mounts": mounts, "env": env, "argv": argv,
                                         "cwd": "/",  # a container's default
                                         "scratch": str(scratch),
                                         "workingDir": ctr.get("workingDir"),
                                         "imagePaths": image_paths()}))
        started = _now()
        with open(logfile, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kubetune.devcluster.podexec",
                                     str(spec_file)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=self.dir)
        with self.lock:
            self.procs[name] = proc
            self.statuses[name] = self._container_status(name, restarts, {
                "running": {"startedAt": started}}, prev)
        if not init:
            self._patch_status({"containerStatuses": [self.statuses[name]]})
        else:
            self._patch_status({"initContainerStatuses": [self.statuses[name]]})
        self.log.info("Started container", container=name, pid=proc.pid, argv=argv[:4])
        code = proc.wait()
        signalled = code < 0
        if signalled:
            code = 128 - code  # -15 -> 143, like a container runtime reports signals
        message = term_file.read_text(errors="replace")[:4096]
        if not message and code != 0 and ctr.get("terminationMessagePolicy") == \
                "FallbackToLogsOnError":
            lines = logfile.read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        reason = "Completed" if code == 0 else "Error"
        self._set_terminated(name, restarts, code, reason, message, started, prev, init=init)
        self.log.info("Container exited", container=name, exit_code=code)
        return code

    def _set_terminated(self, name, restarts, code, reason, message, started, prev,
                        init=False) -> None:
        terminated = {"exitCode": code, "reason": reason, "startedAt": started,
                      "finishedAt": _now(), "containerID": f"process://{self.uid}/{name}"}
        if message:
            terminated["message"] = message
        with self.lock:
            self.statuses[name] = self._container_status(name, restarts,
                                                         {"terminated": terminated}, prev)
            self.ready[name] = False
        key = "initContainerStatuses" if init else "containerStatuses"
        self._patch_status({key: [self.statuses[name]]})

    def _container_status(self, name: str, restarts: int, state: dict, prev: dict | None) -> dict:
        image = next((c.get("image", "") for c in self._all_containers() if c["name"] == name), "")
        status = {"name": name, "image": image, "imageID": f"process://{image}",
                  "containerID": f"process://{self.uid}/{name}", "ready": False,
                  "started": "running" in state, "restartCount": max(restarts, 0),
                  "state": state}
        if prev and "terminated" in prev.get("state", {}):
            status["lastState"] = {"terminated": prev["state"]["terminated"]}
        return status

    def _waiting(self, name: str) -> dict:
        image = next((c.get("image", "") for c in self._all_containers() if c["name"] == name), "")
        return {"name": name, "image": image, "imageID": "", "ready": False, "restartCount": 0,
                "started": False, "state": {"waiting": {"reason": "ContainerCreating"}}}

    def _all_containers(self) -> list[dict]:
        spec = self.pod["spec"]
        return (spec.get("initContainers") or []) + spec["containers"]

    def _statuses_for(self, containers: list[dict]):
        for ctr in containers:
            yield self.statuses.get(ctr["name"]) or self._waiting(ctr["name"])

    def _kill_all(self, grace: int) -> None:
        with self.lock:
            procs = [p for p in self.procs.values() if p.poll() is None]
        for proc in procs:
            _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            remaining = max(deadline - time.monotonic(), 0)
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pass
            _killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.log.warning("Process survived SIGKILL", pid=proc.pid)

    # ---- probes ----------------------------------------------------------------------------
    def _probe_until_done(self, containers: list[dict], threads: list[threading.Thread]) -> None:
        next_probe: dict[str, float] = {}
        started = time.monotonic()
        while any(t.is_alive() for t in threads):
            if self.delete_event.is_set():
                for t in threads:
                    t.join(timeout=0.1)
                self._kill_all(grace=self._grace())
                for t in threads:
                    t.join(timeout=15)
                return
            changed = False
            for ctr in containers:
                name = ctr["name"]
                status = self.statuses.get(name, {})
                running = "running" in status.get("state", {})
                probe = ctr.get("readinessProbe")
                if not running:
                    ready = False
                elif not probe:
                    ready = True
                else:
                    now = time.monotonic()
                    if now - started < probe.get("initialDelaySeconds", 0) or \
                            now < next_probe.get(name, 0):
                        continue
                    next_probe[name] = now + probe.get("periodSeconds", 10) / 5  # faster in tests
                    ready = self._probe(probe, ctr)
                if self.ready.get(name) != ready:
                    self.ready[name] = ready
                    status["ready"] = ready
                    changed = True
            if changed:
                all_ready = all(self.ready.get(c["name"]) for c in containers)
                self._patch_status({
                    "conditions": [self._cond("ContainersReady", all_ready),
                                   self._cond("Ready", all_ready)],
                    "containerStatuses": list(self._statuses_for(containers))})
            time.sleep(0.2)

    def _probe(self, probe: dict, ctr: dict) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                port = self._port(get["port"], ctr)
                url = f"{get.get('scheme', 'HTTP').lower()}://{self.ip}:{port}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                port = self._port(probe["tcpSocket"]["port"], ctr)
                with socket.create_connection((self.ip, port), timeout=timeout):
                    return True
            if "exec" in probe:
                env = self._container_env(ctr)
                return subprocess.call(probe["exec"]["command"], env=env, timeout=timeout + 5,
                                       stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) == 0
        except Exception:  # noqa: BLE001 - a failed probe is "not ready"
            return False
        return True

    @staticmethod
    def _port(port, ctr: dict) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in ctr.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"unknown named port {port}")

    # ---- environment and volumes -----------------------------------------------------------
    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"], "spec.nodeName": self.agent.node_name,
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": self.ip, "status.hostIP": self.agent.host_ip,
            "status.podIPs": self.ip, "status.hostIPs": self.agent.host_ip,
        }
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return (meta.get(match.group(1)) or {}).get(match.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise ValueError(f"unsupported fieldRef {path}")

    def _container_env(self, ctr: dict) -> dict[str, str]:
        # The "image" is this machine with the agent's own Python environment first on PATH.
        path = os.pathsep.join([os.path.dirname(sys.executable),
                                os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
        env = {"PATH": path,
               "HOSTNAME": self.name, "HOME": os.environ.get("HOME", "/root"),
               "KUBERNETES_SERVICE_HOST": self.agent.api_host,
               "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
               "KUBERNETES_SERVICE_PORT_HTTPS": str(self.agent.api_port)}
        for source in ctr.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self.agent.configmap(self.ns, source["configMapRef"]["name"],
                                            source["configMapRef"].get("optional", False))
            else:
                data = self.agent.secret(self.ns, source["secretRef"]["name"],
                                         source["secretRef"].get("optional", False))
            env.update({prefix + k: v for k, v in data.items()})
        for item in ctr.get("env") or []:
            if "value" in item:
                env[item["name"]] = expand(item.get("value") or "", env)
                continue
            ref = item.get("valueFrom") or {}
            if "fieldRef" in ref:
                env[item["name"]] = self._field(ref["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                data = self.agent.configmap(self.ns, r["name"], r.get("optional", False))
                if r["key"] in data:
                    env[item["name"]] = data[r["key"]]
                elif not r.get("optional"):
                    raise ValueError(f"configmap {r['name']} has no key {r['key']}")
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                data = self.agent.secret(self.ns, r["name"], r.get("optional", False))
                if r["key"] in data:
                    env[item["name"]] = data[r["key"]]
                elif not r.get("optional"):
                    raise ValueError(f"secret {r['name']} has no key {r['key']}")
            elif "resourceFieldRef" in ref:
                resource = ref["resourceFieldRef"]["resource"]
                kind, _, res = resource.partition(".")
                value = ((ctr.get("resources") or {}).get(kind) or {}).get(res, "0")
                env[item["name"]] = str(value)
        return env

    def _materialise_volumes(self, volumes: list[dict]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        vol_root = self.dir / "volumes"
        for vol in volumes:
            name = vol["name"]
            path = vol_root / name
            if "hostPath" in vol:
                out[name] = Path(vol["hostPath"]["path"])
                continue
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                path = self.agent.workdir / "pvc" / self.ns / claim
                path.mkdir(parents=True, exist_ok=True)
                out[name] = path
                continue
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                pass
            elif "configMap" in vol:
                src = vol["configMap"]
                self._write_items(path, self.agent.configmap(self.ns, src["name"],
                                                             src.get("optional", False)),
                                  src.get("items"))
            elif "secret" in vol:
                src = vol["secret"]
                self._write_items(path, self.agent.secret(self.ns, src["secretName"],
                                                          src.get("optional", False)),
                                  src.get("items"))
            elif "downwardAPI" in vol:
                for item in vol["downwardAPI"].get("items") or []:
                    self._write_file(path / item["path"], self._field(item["fieldRef"]["fieldPath"]))
            elif "projected" in vol:
                for source in vol["projected"].get("sources") or []:
                    self._project(path, source)
            else:
                raise ValueError(f"volume {name}: unsupported volume type "
                                 f"{sorted(set(vol) - {'name'})}")
            out[name] = path
        return out

    def _project(self, path: Path, source: dict) -> None:
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            sa = self.pod["spec"].get("serviceAccountName") or "default"
            token = self.agent.token(self.ns, sa, self.name, self.uid,
                                     sat.get("expirationSeconds", 3607), sat.get("audience"))
            self._write_file(path / sat["path"], token)
        elif "configMap" in source:
            src = source["configMap"]
            self._write_items(path, self.agent.configmap(self.ns, src["name"],
                                                         src.get("optional", False)),
                              src.get("items"))
        elif "secret" in source:
            src = source["secret"]
            self._write_items(path, self.agent.secret(self.ns, src["name"],
                                                      src.get("optional", False)),
                              src.get("items"))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                self._write_file(path / item["path"], self._field(item["fieldRef"]["fieldPath"]))

    def _write_items(self, path: Path, data: dict[str, str], items: list | None) -> None:
        if items:
            for item in items:
                if item["key"] in data:
                    self._write_file(path / item["path"], data[item["key"]])
        else:
            for key, value in data.items():
                self._write_file(path / key, value)

    @staticmethod
    def _write_file(path: Path, value: str | bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value if isinstance(value, bytes) else value.encode())

    # ---- status ----------------------------------------------------------------------------
    @staticmethod
    def _cond(kind: str, ok: bool, reason: str | None = None, message: str | None = None) -> dict:
        cond = {"type": kind, "status": "True" if ok else "False",
                "lastTransitionTime": _now(), "lastProbeTime": None}
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def _patch_status(self, status: dict) -> None:
        if self.gone_event.is_set():
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.ns, {"status": status})
        except ApiException as exc:
            if exc.status == 404:
                self.gone()
            else:
                self.log.warning("Failed to write pod status", status=exc.status,
                                 error=exc.reason)


def image_paths() -> list[str]:
    """What the "image" (this machine's Python environment) needs visible in every pod."""
    import kubetune

    paths = [sys.prefix, str(Path(kubetune.__file__).resolve().parents[1])]
    paths += [p for p in sys.path if p and os.path.isdir(p)]
    out: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths}, key=len):
        if not any(path == o or path.startswith(o + "/") for o in out):
            out.append(path)  # parents first; children are covered by them
    return out


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class NodeAgent:
    def __init__(self, api: client.ApiClient, node_name: str, workdir: Path, *,
                 ip_prefix: str, capacity: dict[str, str], labels: dict[str, str],
                 taints: list[dict]):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.node_name = node_name
        self.workdir = workdir
        self.ip_prefix = ip_prefix  # e.g. "127.23." -> pods get 127.23.Y.Z
        self.capacity = capacity
        self.labels = labels
        self.taints = taints
        self.host_ip = "127.0.0.1"
        host = api.configuration.host.split("://", 1)[1]
        self.api_host, _, port = host.rpartition(":")
        self.api_port = int(port)
        self.runs: dict[str, PodRun] = {}
        self.latest: dict[str, dict] = {}
        self.ips_in_use: set[str] = set()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    # ---- helpers used by pod runs ----------------------------------------------------------
    def allocate_ip(self) -> str:
        with self.lock:
            for n in range(1, 250 * 250):
                ip = f"{self.ip_prefix}{n // 250}.{n % 250 + 2}"
                if ip not in self.ips_in_use:
                    self.ips_in_use.add(ip)
                    return ip
        raise RuntimeError("no free pod IP")

    def release_ip(self, ip: str) -> None:
        with self.lock:
            self.ips_in_use.discard(ip)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.runs.pop(uid, None)
            self.latest.pop(uid, None)

    def current(self, uid: str) -> dict | None:
        with self.lock:
            return self.latest.get(uid)

    def configmap(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        try:
            cm = self.api.sanitize_for_serialization(self.core.read_namespaced_config_map(name, ns))
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise ValueError(f"configmap {ns}/{name}: {exc.reason}") from exc
        data = dict(cm.get("data") or {})
        data.update({k: base64.b64decode(v).decode("latin-1")
                     for k, v in (cm.get("binaryData") or {}).items()})
        return data

    def secret(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        try:
            sec = self.api.sanitize_for_serialization(self.core.read_namespaced_secret(name, ns))
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise ValueError(f"secret {ns}/{name}: {exc.reason}") from exc
        return {k: base64.b64decode(v).decode() for k, v in (sec.get("data") or {}).items()}

    def token(self, ns: str, sa: str, pod: str, uid: str, seconds: int, audience: str | None) -> str:
        body = {"spec": {"expirationSeconds": max(int(seconds), 600),
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod,
                                            "uid": uid}}}
        if audience:
            body["spec"]["audiences"] = [audience]
        resp = self.core.create_namespaced_service_account_token(sa, ns, body)
        return resp.status.token

    # ---- node ------------------------------------------------------------------------------
    def node_body(self) -> dict:
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node_name, "labels": {
                "kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "kubetune.io/process-agent": "true",
                **self.labels}},
            "spec": {"taints": self.taints} if self.taints else {},
        }

    def node_status(self) -> dict:
        now = _now()
        return {
            "capacity": self.capacity, "allocatable": self.capacity,
            "addresses": [{"type": "InternalIP", "address": self.host_ip},
                          {"type": "Hostname", "address": self.node_name}],
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": m,
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
                for t, s, r, m in (
                    ("Ready", "True", "KubeletReady", "process node agent is posting ready status"),
                    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                    ("PIDPressure", "False", "KubeletHasSufficientPID", "ok"))],
            "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "",
                         "containerRuntimeVersion": "process://kubetune", "osImage": "linux",
                         "operatingSystem": "linux", "architecture": "amd64",
                         "kernelVersion": os.uname().release, "machineID": "",
                         "systemUUID": "", "bootID": ""},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }

    def register(self) -> None:
        try:
            self.core.create_node(self.node_body())
            log.info("Registered node", node=self.node_name)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.core.patch_node_status(self.node_name, {"status": self.node_status()})

    def heartbeat(self) -> None:
        while not self.stop_event.wait(5):
            try:
                self.core.patch_node_status(self.node_name, {"status": {
                    "conditions": self.node_status()["conditions"][:1]}})
                self._renew_lease()
            except ApiException as exc:
                if exc.status == 404:
                    log.info("Node was deleted; registering again", node=self.node_name)
                    try:
                        self.register()
                    except Exception as err:  # noqa: BLE001
                        log.warning("Failed to register node", error=str(err))
                else:
                    log.warning("Heartbeat failed", error=str(exc.reason))
            except Exception as exc:  # noqa: BLE001 - keep beating through API hiccups
                log.warning("Heartbeat failed", error=str(exc))

    def _renew_lease(self) -> None:
        body = {"metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                         "renewTime": _micro_now()}}
        try:
            self.coord.patch_namespaced_lease(self.node_name, "kube-node-lease", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    # ---- pods ------------------------------------------------------------------------------
    def handle(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            run = self.runs.get(uid)
            if kind != "DELETED":
                self.latest[uid] = pod
        if kind == "DELETED":
            if run:
                run.gone()
            return
        if run is None:
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if pod["metadata"].get("deletionTimestamp"):
                # Never started (or started by an earlier agent): finish the delete.
                run = PodRun(self, pod)
                with self.lock:
                    self.runs[uid] = run
                run.request_delete()
                threading.Thread(target=lambda: (run._finish_delete(), self.forget(uid),
                                                 self.release_ip(run.ip)), daemon=True).start()
                return
            if phase in ("Succeeded", "Failed"):
                return
            if phase == "Running":
                # Its processes belonged to an earlier agent and are gone.
                self.core.patch_namespaced_pod_status(pod["metadata"]["name"],
                                                      pod["metadata"]["namespace"], {"status": {
                                                          "phase": "Failed",
                                                          "reason": "NodeAgentRestarted",
                                                          "message": "the process node agent "
                                                                     "restarted; processes lost"}})
                return
            run = PodRun(self, pod)
            with self.lock:
                self.runs[uid] = run
            run.start()
            return
        if pod["metadata"].get("deletionTimestamp"):
            run.request_delete()

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self.stop_event.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(field_selector=selector)
                seen = set()
                for item in listing.items:
                    pod = self.api.sanitize_for_serialization(item)
                    seen.add(pod["metadata"]["uid"])
                    self.handle("ADDED", pod)
                with self.lock:
                    vanished = [r for uid, r in self.runs.items() if uid not in seen]
                for run in vanished:
                    run.gone()
                stream = watch.Watch()
                for event in stream.stream(self.core.list_pod_for_all_namespaces,
                                           field_selector=selector,
                                           resource_version=listing.metadata.resource_version,
                                           timeout_seconds=60, _preload_content=True):
                    if self.stop_event.is_set():
                        stream.stop()
                        break
                    pod = self.api.sanitize_for_serialization(event["object"])
                    self.handle(event["type"], pod)
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("Pod watch failed", error=str(exc.reason))
                    time.sleep(1)
            except Exception as exc:  # noqa: BLE001 - reconnect after any watch failure
                log.warning("Pod watch failed", error=str(exc))
                time.sleep(1)

    def run(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.register()
        self._renew_lease()
        threading.Thread(target=self.heartbeat, daemon=True).start()
        self.watch_pods()

    def shutdown(self) -> None:
        self.stop_event.set()
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.gone()
            run._kill_all(grace=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune-nodeagent", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--ip-prefix", default="127.42.")
    parser.add_argument("--capacity", default="cpu=16,memory=64Gi,pods=110,nvidia.com/gpu=8",
                        help="comma-separated resource=quantity")
    parser.add_argument("--labels", default="", help="comma-separated key=value")
    parser.add_argument("--taints", default="", help="comma-separated key=value:Effect")
    args = parser.parse_args(argv)

    structlog.configure(processors=[structlog.processors.TimeStamper(fmt="iso"),
                                    structlog.processors.add_log_level,
                                    structlog.processors.JSONRenderer()])
    api = config.new_client_from_config(config_file=args.kubeconfig)
    capacity = dict(kv.split("=", 1) for kv in args.capacity.split(",") if kv)
    labels = dict(kv.split("=", 1) for kv in args.labels.split(",") if kv)
    taints = []
    for item in filter(None, args.taints.split(",")):
        keyval, _, effect = item.partition(":")
        key, _, value = keyval.partition("=")
        taints.append({"key": key, "value": value, "effect": effect})
    agent = NodeAgent(api, args.node_name, args.workdir, ip_prefix=args.ip_prefix,
                      capacity=capacity, labels=labels, taints=taints)

    def on_term(signum, frame):  # noqa: ARG001
        agent.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
