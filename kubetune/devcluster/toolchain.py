"""Build and cache the pinned control-plane binaries from Go modules.

There is no Docker and no release download here, so every binary the dev cluster needs is
compiled from the Go module proxy once per machine and kept under a per-user cache folder keyed
by version: ``$XDG_CACHE_HOME/kubetune/bin/<tool>-<version>/<tool>``.

Kubernetes itself cannot be ``go install``ed (its go.mod replaces the ``k8s.io/*`` staging
modules with local folders), so it is built from a throw-away module that requires
``k8s.io/kubernetes`` and replaces each staging module with its published ``v0.Y.Z`` twin.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.5"  # the etcd that kubernetes v1.35.4's go.mod pins
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.19.5"
COREDNS_VERSION = "v1.14.7"  # cluster DNS on the real node
REGISTRY_VERSION = "v3.0.0"  # the CNCF distribution registry: images for the real node
KUEUE_VERSION = "v0.17.0"  # job queueing (optional: `dev-cluster up --with kueue`)
# GitOps (optional: `dev-cluster up --with flux`). The newest whose every dependency the module
# proxy here serves (v1.10.x needs fluxcd/pkg and cosign versions it refuses, and Go 1.27).
FLUX_SOURCE_VERSION = "v1.9.3"
FLUX_KUSTOMIZE_VERSION = "v1.9.6"

K8S_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
                "kubelet", "kube-proxy")
ALL_TOOLS = (*K8S_COMMANDS, "etcd", "kwok", "helm", "coredns", "registry")
OPTIONAL_TOOLS = ("kueue", "source-controller", "kustomize-controller")  # built when asked


class ToolchainError(RuntimeError):
    """A binary could not be built; the message says which and why."""


@dataclass(frozen=True)
class Tool:
    name: str
    version: str

    @property
    def path(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-{self.version}" / self.name


def cache_dir() -> Path:
    base = os.environ.get("KUBETUNE_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubetune"


def tool(name: str) -> Tool:
    version = {
        "etcd": ETCD_VERSION,
        "kwok": KWOK_VERSION,
        "helm": HELM_VERSION,
        "coredns": COREDNS_VERSION,
        "registry": REGISTRY_VERSION,
        "kueue": KUEUE_VERSION,
        "source-controller": FLUX_SOURCE_VERSION,
        "kustomize-controller": FLUX_KUSTOMIZE_VERSION,
    }.get(name, KUBERNETES_VERSION)
    return Tool(name, version)


def binary(name: str) -> Path:
    """Path of a built tool; raises a clear error when it has not been built yet."""
    path = tool(name).path
    if not path.exists():
        raise ToolchainError(
            f"{name} {tool(name).version} is not built: run `kubetune dev-cluster build` "
            f"(expected at {path})"
        )
    return path


def missing() -> list[str]:
    return [name for name in ALL_TOOLS if not tool(name).path.exists()]


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise ToolchainError(
            "the Go toolchain is missing: install Go >= 1.25 (needed to build the dev cluster "
            "binaries from the Go module proxy)"
        )
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "0")
    env.setdefault("GOFLAGS", "-mod=mod")
    return env


def _run(cmd: list[str], cwd: Path, what: str, log: Path) -> None:
    """Run a long go command with a progress line on stderr; full output goes to ``log``."""
    start = time.monotonic()
    done = threading.Event()

    def ticker() -> None:
        while not done.wait(15):
            elapsed = int(time.monotonic() - start)
            print(f"  ... building {what}: {elapsed // 60}m{elapsed % 60:02d}s", file=sys.stderr,
                  flush=True)

    print(f"Building {what} (first time on this machine; cached afterwards)", file=sys.stderr,
          flush=True)
    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        with open(log, "ab") as out:
            rc = subprocess.call(cmd, cwd=cwd, env=_go_env(), stdout=out, stderr=subprocess.STDOUT)
    finally:
        done.set()
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ToolchainError(f"building {what} failed (exit {rc}); see {log}:\n{tail}")
    elapsed = int(time.monotonic() - start)
    print(f"Built {what} in {elapsed // 60}m{elapsed % 60:02d}s", file=sys.stderr, flush=True)


def _staging_replaces(go: str, workdir: Path) -> list[str]:
    """The staging modules that k8s.io/kubernetes replaces with local folders."""
    out = subprocess.check_output(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=workdir, env=_go_env(), text=True,
    )
    gomod = Path(re.search(r'"GoMod":\s*"([^"]+)"', out).group(1)).read_text()
    names = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, flags=re.M)
    if not names:
        raise ToolchainError("found no staging replaces in k8s.io/kubernetes go.mod")
    return names


def _build_kubernetes(go: str, build_root: Path) -> None:
    work = build_root / f"kubernetes-{KUBERNETES_VERSION}"
    work.mkdir(parents=True, exist_ok=True)
    minor = KUBERNETES_VERSION.split(".", 1)[1]  # "35.4"
    staging = _staging_replaces(go, work)
    replaces = "\n".join(f"\t{name} => {name} v0.{minor}" for name in staging)
    (work / "go.mod").write_text(
        "module kubetune.local/k8sbuild\n\ngo 1.25.0\n\n"
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n{replaces}\n)\n"
    )
    (work / "tools.go").write_text(
        "//go:build tools\n\npackage tools\n\n"
        + "".join(f'import _ "k8s.io/kubernetes/cmd/{c}"\n' for c in K8S_COMMANDS)
    )
    log = work / "build.log"
    _run([go, "mod", "tidy"], work, "kubernetes module graph", log)
    out = work / "out"
    out.mkdir(exist_ok=True)
    version_flags = (
        f"-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} "
        f"-X k8s.io/component-base/version.gitMajor=1 "
        f"-X k8s.io/component-base/version.gitMinor={minor.split('.')[0]} "
        f"-X k8s.io/client-go/pkg/version.gitVersion={KUBERNETES_VERSION} "
        f"-X k8s.io/client-go/pkg/version.gitMajor=1 "
        f"-X k8s.io/client-go/pkg/version.gitMinor={minor.split('.')[0]}"
    )
    _run(
        [go, "build", "-trimpath", "-ldflags", f"-s -w {version_flags}", "-o", str(out)]
        + [f"k8s.io/kubernetes/cmd/{c}" for c in K8S_COMMANDS],
        work, f"kubernetes {KUBERNETES_VERSION} ({', '.join(K8S_COMMANDS)})", log,
    )
    for name in K8S_COMMANDS:
        _install(out / name, tool(name).path)


def _build_etcd(go: str, build_root: Path) -> None:
    work = build_root / f"etcd-{ETCD_VERSION}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(
        f"module kubetune.local/etcdbuild\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
    )
    (work / "main.go").write_text(
        'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    log = work / "build.log"
    _run([go, "mod", "tidy"], work, "etcd module graph", log)
    _run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", "etcd", "."], work,
         f"etcd {ETCD_VERSION}", log)
    _install(work / "etcd", tool("etcd").path)


def _go_install(go: str, build_root: Path, name: str, package: str, version: str) -> None:
    work = build_root / f"{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    env_bin = work / "gobin"
    log = work / "build.log"
    cmd = [go, "install", "-trimpath", "-ldflags", "-s -w", f"{package}@{version}"]
    start_env = _go_env()
    start_env["GOBIN"] = str(env_bin)
    start_env.pop("GOFLAGS", None)
    print(f"Building {name} {version}", file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        rc = subprocess.call(cmd, cwd=work, env=start_env, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        raise ToolchainError(f"building {name} failed (exit {rc}); see {log}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
    _install(env_bin / name, tool(name).path)


def _build_kueue(go: str, build_root: Path) -> None:
    """The controller, and beside it the CRDs and webhook manifests of the same module."""
    work = build_root / f"kueue-{KUEUE_VERSION}"
    work.mkdir(parents=True, exist_ok=True)
    module = f"sigs.k8s.io/kueue@{KUEUE_VERSION}"
    out = subprocess.check_output([go, "mod", "download", "-json", module], cwd=work,
                                  env={**_go_env(), "GOFLAGS": ""}, text=True)
    source = Path(re.search(r'"Dir":\s*"([^"]+)"', out).group(1)) / "config" / "components"
    manifests = tool("kueue").path.parent / "manifests"
    shutil.rmtree(manifests, ignore_errors=True)
    (manifests / "crds").mkdir(parents=True)
    for crd in sorted((source / "crd" / "bases").glob("*.yaml")):
        shutil.copyfile(crd, manifests / "crds" / crd.name)
    shutil.copyfile(source / "webhook" / "manifests.yaml", manifests / "webhooks.yaml")
    _go_install(go, build_root, "kueue", "sigs.k8s.io/kueue/cmd/kueue", KUEUE_VERSION)


# Their go.mod replaces (copied: a module's replaces do not apply to a module requiring it;
# their ./api replace is not needed, the api module is published).
FLUX_REPLACES = {
    "source-controller": (
        "github.com/opencontainers/go-digest => github.com/opencontainers/go-digest "
        "v1.0.1-0.20220411205349-bde1400a84be",),
    "kustomize-controller": (
        "github.com/opencontainers/go-digest => github.com/opencontainers/go-digest "
        "v1.0.1-0.20220411205349-bde1400a84be",
        "sigs.k8s.io/kustomize/api => sigs.k8s.io/kustomize/api v0.21.1",
        "sigs.k8s.io/kustomize/kyaml => sigs.k8s.io/kustomize/kyaml v0.21.1",
        "gopkg.in/yaml.v3 => gopkg.in/yaml.v3 v3.0.1"),
}


def _build_flux(name: str):
    """A Flux controller, built from a throw-away module that requires it (its go.mod has
    replace directives, so `go install` refuses it), with its CRDs beside the binary."""
    def build(go: str, build_root: Path) -> None:
        version = tool(name).version
        module = f"github.com/fluxcd/{name}"
        work = build_root / f"{name}-{version}"
        work.mkdir(parents=True, exist_ok=True)
        replaces = "\n".join(f"replace {r}" for r in FLUX_REPLACES[name])
        (work / "go.mod").write_text(f"module kubetune.local/{name}build\n\ngo 1.26.0\n\n"
                                     f"require {module} {version}\n\n{replaces}\n")
        log = work / "build.log"
        out = subprocess.check_output([go, "mod", "download", "-json", f"{module}@{version}"],
                                      cwd=work, env=_go_env(), text=True)
        source = Path(re.search(r'"Dir":\s*"([^"]+)"', out).group(1))
        _run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(work / name), module],
             work, f"{name} {version}", log)
        manifests = tool(name).path.parent / "manifests"
        shutil.rmtree(manifests, ignore_errors=True)
        (manifests / "crds").mkdir(parents=True)
        for crd in sorted((source / "config" / "crd" / "bases").glob("*.yaml")):
            shutil.copyfile(crd, manifests / "crds" / crd.name)
        _install(work / name, tool(name).path)
    return build


def ensure_optional(name: str) -> Path:
    """An optional tool (Kueue), built the first time it is asked for."""
    if name not in OPTIONAL_TOOLS:
        raise ValueError(f"{name} is not an optional tool")
    if not tool(name).path.exists():
        build_root = cache_dir() / "build"
        build_root.mkdir(parents=True, exist_ok=True)
        builders = {"kueue": _build_kueue, "source-controller": _build_flux("source-controller"),
                    "kustomize-controller": _build_flux("kustomize-controller")}
        builders[name](_go(), build_root)
    return tool(name).path


def _install(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    shutil.copy2(src, tmp)
    tmp.chmod(0o755)
    tmp.replace(dst)  # atomic: a half-copied binary is never taken for a built one


def ensure_built() -> dict[str, Path]:
    """Build whatever is missing (once per machine) and return every tool's path."""
    todo = missing()
    if todo:
        go = _go()
        build_root = cache_dir() / "build"
        build_root.mkdir(parents=True, exist_ok=True)
        if any(name in K8S_COMMANDS for name in todo):
            _build_kubernetes(go, build_root)
        if "etcd" in todo:
            _build_etcd(go, build_root)
        if "kwok" in todo:
            _go_install(go, build_root, "kwok", "sigs.k8s.io/kwok/cmd/kwok", KWOK_VERSION)
        if "helm" in todo:
            _go_install(go, build_root, "helm", "helm.sh/helm/v3/cmd/helm", HELM_VERSION)
        if "coredns" in todo:
            _go_install(go, build_root, "coredns", "github.com/coredns/coredns", COREDNS_VERSION)
        if "registry" in todo:
            _go_install(go, build_root, "registry",
                        "github.com/distribution/distribution/v3/cmd/registry", REGISTRY_VERSION)
    still = missing()
    if still:
        raise ToolchainError(f"still missing after build: {', '.join(still)}")
    return {name: tool(name).path for name in ALL_TOOLS}


if __name__ == "__main__":  # pragma: no cover - convenience for `python -m`
    for name, path in ensure_built().items():
        print(f"{name}\t{path}")
