"""`scripts/demo`: the whole loop on the dev cluster, as a user runs it.

dev cluster with its real node and our images → `helm install` of the chart with those images
→ a `kubetune serve` Deployment → `kubectl apply -f examples/finetunejob-lora.yaml` with live
progress → the LoRAAdapter it publishes, pointed at the Deployment and hot-swapped into every
replica → one prompt answered through the OpenAI API by the base model and by the adapter,
side by side. Every step says what it runs; the first failing step ends the demo (exit 1).
A second run reuses the cluster, the images and the release; `--down` tears everything down.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from .cluster import DevCluster
from .realnode import NODE_LABELS

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
SYSTEM = "kubetune-system"
RELEASE = "kubetune"
JOB = "quickstart-lora"
SERVE = "kubetune-serve"
ENGINE_KEY = "engine-key"  # Secret with the serving pods' API key (examples/serving)
PROMPT = ("Review: The breakfast was superb but the shower was broken.\n"
          "Is this review positive, negative or mixed? Answer with one word.")
REAL_NODE = {"kubetune.io/real-node": NODE_LABELS["kubetune.io/real-node"]}


class DemoError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(msg, flush=True)


def step(title: str) -> None:
    say(f"\n==> {title}")


class Demo:
    def __init__(self, cluster: DevCluster):
        self.cluster = cluster
        self.env: dict[str, str] = {}
        self.engine_key = ""

    def run(self, *cmd: str, input: str | None = None, check: bool = True,
            quiet: bool = False) -> str:
        if not quiet:  # polling reads are not echoed
            say("$ " + " ".join(cmd if len(" ".join(cmd)) < 160 else (*cmd[:6], "…")))
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=600)
        if check and proc.returncode != 0:
            raise DemoError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                quiet: bool = False) -> str:
        return self.run("kubectl", *args, input=input, check=check, quiet=quiet)

    def up(self) -> None:
        step("Dev cluster: control plane, the real node (kubelet + containerd), S3, our images")
        self.cluster.up(progress=lambda m: say(f"  {m}"))
        self.env = self.cluster.env()
        say(self.kubectl("get", "nodes", "-o", "wide"))

    def install(self) -> None:
        step("helm install the chart with the images built from our Dockerfile")
        operator, trainer = self.env["KUBETUNE_OPERATOR_IMAGE"], self.env["KUBETUNE_TRAINER_IMAGE"]
        crds = []
        if self._crds_outside_helm():  # e.g. applied by the test suite on this cluster
            say("  (the CRDs exist outside Helm, e.g. from a test run: applied, not by the chart)")
            self.kubectl("apply", "-f", str(ROOT / "crds"))
            crds = ["--set", "crds.enabled=false"]
        self.run("helm", "upgrade", "--install", RELEASE, str(ROOT / "charts" / "kubetune"), *crds,
                 "--namespace", SYSTEM, "--create-namespace",
                 "--set", f"operator.image.repository={operator.rsplit(':', 1)[0]}",
                 "--set", f"operator.image.tag={operator.rsplit(':', 1)[1]}",
                 "--set", f"trainer.image.repository={trainer.rsplit(':', 1)[0]}",
                 "--set", f"trainer.image.tag={trainer.rsplit(':', 1)[1]}",
                 "--set-json", f"operator.nodeSelector={json.dumps(REAL_NODE)}",
                 "--set-json", 'operator.tolerations=[{"key":"nvidia.com/gpu","operator":"Exists"}]',
                 "--set-json", f"gpu.nodeSelector={json.dumps(REAL_NODE)}",
                 "--set-json", f"gpu.mergeNodeSelector={json.dumps(REAL_NODE)}",
                 "--set", "operator.adapterResyncSeconds=5",
                 "--set", f"s3.endpoint={self.env['KUBETUNE_S3_ENDPOINT']}",
                 "--set", "s3.credentialsSecret=s3-creds", "--wait", "--timeout", "300s")
        say(self.kubectl("get", "pods", "-n", SYSTEM, "-o", "wide"))

    def _crds_outside_helm(self) -> bool:
        out = self.kubectl("get", "crd", "finetunejobs.kubetune.io", "-o", "json",
                           "--ignore-not-found")
        if not out.strip():
            return False
        annotations = json.loads(out)["metadata"].get("annotations") or {}
        return annotations.get("meta.helm.sh/release-name") != RELEASE

    def serving(self) -> None:
        step(f"Namespace {NAMESPACE} (restricted pods), S3 credentials, an API key, `kubetune serve` x2")
        if self.kubectl("get", "namespace", NAMESPACE, check=False).strip():
            for kind in ("finetunejob", "loraadapter"):  # a fresh run of the loop
                self.kubectl("delete", kind, "--all", "-n", NAMESPACE, "--wait=true",
                             "--timeout=120s")
        else:
            self.kubectl("create", "namespace", NAMESPACE)
        self.kubectl("label", "--overwrite", "namespace", NAMESPACE,
                     "pod-security.kubernetes.io/enforce=restricted")
        secret = {"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": "s3-creds", "namespace": NAMESPACE},
                  "stringData": {k: self.env[k] for k in ("AWS_ACCESS_KEY_ID",
                                                          "AWS_SECRET_ACCESS_KEY")}}
        self.kubectl("apply", "-f", "-", input=json.dumps(secret))
        self.engine_key = self._engine_key()
        deployment = yaml.safe_load((ROOT / "examples" / "serving" /
                                     "serve-deployment.yaml").read_text())
        pod = deployment["spec"]["template"]["spec"]
        pod["nodeSelector"] = REAL_NODE
        server = pod["containers"][0]
        server["image"] = self.env["KUBETUNE_SERVE_IMAGE"]
        for var in server["env"]:
            if var["name"] == "AWS_ENDPOINT_URL_S3":
                var["value"] = self.env["KUBETUNE_S3_ENDPOINT"]
        say(f"  (examples/serving/serve-deployment.yaml with image {server['image']})")
        self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(deployment))
        self.kubectl("rollout", "status", f"deployment/{SERVE}", "-n", NAMESPACE,
                     "--timeout=300s")

    def train(self) -> None:
        step("kubectl apply -f examples/finetunejob-lora.yaml (the trainer image, on the node)")
        self.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" /
                                                           "finetunejob-lora.yaml"))
        deadline = time.monotonic() + 1200
        last = ""
        while time.monotonic() < deadline:
            st = self._get("finetunejob", JOB).get("status") or {}
            prog = st.get("progress") or {}
            line = (f"  {st.get('phase', 'Pending'):<10} step {prog.get('step', 0)}/"
                    f"{prog.get('totalSteps', '?')}  loss {prog.get('loss', '-')}  "
                    f"eval {prog.get('evalLoss', '-')}  {prog.get('tokensPerSecond', '-')} tok/s")
            if line != last:
                say(line)
                last = line
            if st.get("phase") == "Succeeded":
                say(f"  artifact: {(st.get('artifact') or {}).get('uri')}")
                metrics = st.get("metrics") or {}
                gate = next((c for c in st.get("conditions") or []
                             if c["type"] == "EvalPassed"), {})
                say(f"  task score on {metrics.get('scoreSamples')} held-out reviews: "
                    f"normalized match {metrics.get('normalizedMatch')}, exact match "
                    f"{metrics.get('exactMatch')}; EvalPassed={gate.get('status')} "
                    f"({gate.get('message', '')})")
                return
            if st.get("phase") == "Failed":
                raise DemoError(f"the FineTuneJob failed: {json.dumps(st, indent=1)}")
            time.sleep(2)
        raise DemoError("the FineTuneJob did not finish within 20 minutes")

    def hot_swap(self) -> list[str]:
        step(f"The LoRAAdapter {JOB}: point it at {SERVE}; it is hot-swapped into every replica")
        self.kubectl("patch", "loraadapter", JOB, "-n", NAMESPACE, "--type=merge", "-p",
                     json.dumps({"spec": {"target": {"deployment": SERVE, "apiKeySecret": {
                         "name": ENGINE_KEY}}}}))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            adapter = self._get("loraadapter", JOB)
            generation = adapter["metadata"]["generation"]
            conds = {c["type"]: c for c in (adapter.get("status") or {}).get("conditions") or []
                     if c.get("observedGeneration") == generation}  # not the pre-patch ones
            if all((conds.get(t) or {}).get("status") == "True" for t in ("Loaded", "Ready")):
                say(self.kubectl("get", "loraadapter", "-n", NAMESPACE))
                pods = json.loads(self.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                               f"app={SERVE}", "-o", "json",
                                               quiet=True))["items"]
                return [p["status"]["podIP"] for p in pods if p["status"].get("podIP")]
            time.sleep(2)
        raise DemoError(f"the adapter was not Ready within 5 minutes: "
                        f"{json.dumps(self._get('loraadapter', JOB).get('status'), indent=1)}")

    def ask(self, ips: list[str]) -> None:
        step(f"One prompt through the OpenAI API of replica {ips[0]}: base vs adapter")
        name = self._get("loraadapter", JOB)["spec"]["servingName"]
        answers = {model: _chat(ips[0], model, self.engine_key) for model in ("base", name)}
        width = max(len(m) for m in answers)
        say("  prompt: " + PROMPT.replace("\n", "\n          "))
        for model, text in answers.items():
            say(f"  {model:<{width}} │ {text!r}")

    def _engine_key(self) -> str:
        """The serving pods' API key (Secret engine-key, as the example Deployment expects):
        kept across demo runs, made once, never echoed."""
        out = self.kubectl("get", "secret", ENGINE_KEY, "-n", NAMESPACE, "-o", "json",
                           "--ignore-not-found", quiet=True)
        if out.strip():
            return base64.b64decode(json.loads(out)["data"]["API_KEY"]).decode()
        key = secrets.token_hex(24)
        self.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": ENGINE_KEY, "namespace": NAMESPACE},
            "stringData": {"API_KEY": key}}))
        return key

    def _get(self, kind: str, name: str) -> dict:
        out = self.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False,
                           quiet=True)
        return json.loads(out) if out.strip() else {}

    def down(self) -> None:
        if self.cluster.running():
            self.env = self.cluster.env()
            self.run("helm", "uninstall", RELEASE, "--namespace", SYSTEM, check=False)
        self.cluster.down(progress=say)


def _chat(ip: str, model: str, key: str) -> str:
    body = json.dumps({"model": model, "max_tokens": 24, "temperature": 0,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()
    req = urllib.request.Request(f"http://{ip}:8000/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["message"]["content"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", action="store_true", help="tear the demo and its cluster down")
    parser.add_argument("--dir", type=Path, default=None, help="the dev cluster's folder")
    args = parser.parse_args(argv)
    demo = Demo(DevCluster(args.dir))
    if args.down:
        demo.down()
        return 0
    t0 = time.monotonic()
    try:
        demo.up()
        demo.install()
        demo.serving()
        demo.train()
        demo.ask(demo.hot_swap())
    except Exception as exc:  # noqa: BLE001 - one clear failure, non-zero exit
        say(f"\ndemo: FAILED: {exc}")
        return 1
    say(f"\nDemo done in {time.monotonic() - t0:.0f}s. The cluster keeps running: "
        f"eval \"$(kubetune dev-cluster env)\"; kubectl get ftj,lora -n {NAMESPACE}. "
        f"Tear down: scripts/demo --down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
