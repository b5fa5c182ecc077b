"""Container images for the real node, built here with buildah (no registry is reachable).

* ``pause``: kubernetes' own ``build/pause/linux/pause.c`` (from the Go module cache), compiled
  statically into a ``FROM scratch`` image: the pods' sandbox image.
* ``coredns``: the CoreDNS binary built by the toolchain, ``FROM scratch``: cluster DNS.
* ``python-base``: Debian bookworm (``debootstrap --variant=minbase``, Python 3.11 from Debian)
  with a virtual environment on ``PATH``: the dev cluster's stand-in for the Dockerfile's
  public ``python:3.11-slim`` base (``--build-arg PYTHON_IMAGE``).
* ``operator``, ``trainer``, ``serve``: the project's ``Dockerfile`` targets, built with the
  dependencies installed offline from a wheelhouse hard-linked from kubetune's wheel store (so
  torch is never downloaded twice: this registry sends no cache headers, so pip's own cache
  keeps nothing) through a ``pip.conf`` mounted into the build only.

Every image is tagged with a digest of what it is built from, so an unchanged input is never
rebuilt; buildah's layer cache makes a code change rebuild only the code layer. Builds run in a
private mount namespace with buildah's storage and caches in kubetune's cache folder: nothing is
written under the host's ``/var`` or ``/run``. Images reach the node through a registry (the
CNCF distribution registry, on the cluster's host address, its storage in kubetune's cache):
buildah pushes only the layers it lacks, and containerd pulls ``localhost/kubetune/…`` from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import procs, toolchain

ROOT = Path(__file__).resolve().parents[2]
PAUSE_VERSION = "3.10"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv")
PROJECT_TARGETS = ("operator", "trainer", "serve")
# What a project image is built from (its digest is the image's tag).
PROJECT_INPUTS = ("Dockerfile", ".dockerignore", "docker", "pyproject.toml", "constraints.txt",
                  "README.md", "kubetune", "operator", "trainer")
DEPENDENCY_INPUTS = ("pyproject.toml", "constraints.txt", "docker")


class ImageError(RuntimeError):
    """An image could not be built or loaded; the message says which and why."""


@dataclass(frozen=True)
class Image:
    name: str  # e.g. localhost/kubetune/trainer:3f2a…

    @property
    def repository(self) -> str:
        return self.name.rsplit(":", 1)[0]


def images_dir() -> Path:
    return toolchain.cache_dir() / "images"


def registry_storage() -> Path:
    """The registry's storage: in the cache, so an image pushed once is never pushed again."""
    return images_dir() / "registry"


def registry_hosts(directory: Path) -> Path:
    """containerd's host configuration folder of the node in ``directory``."""
    return directory / "certs.d"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _digest_paths(paths: list[Path], extra: str = "") -> str:
    """A digest of files and folders (names, modes and contents; caches and bytecode skipped)."""
    h = hashlib.sha256(extra.encode())
    for top in paths:
        files = [top] if top.is_file() else sorted(
            p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and not p.name.endswith((".pyc", ".egg-info")) and ".egg-info" not in str(p))
        for path in files:
            h.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


class Buildah:
    """buildah with its storage in kubetune's cache, run in a private mount namespace."""

    def __init__(self):
        self.dir = images_dir()
        for sub in ("storage", "run", "tmp", "scratch"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def command(self, *args: str) -> list[str]:
        # Paths buildah writes that no flag moves: bound from our cache, privately.
        private = {"blob-cache": "/var/lib/containers/cache", "cni-conf": "/etc/cni/net.d",
                   "cni-lib": "/var/lib/cni"}
        return [sys.executable, "-m", "kubetune.devcluster.privatemounts",
                f"--scratch={self.dir / 'scratch'}",
                *[f"--bind={self.dir / src}:{dst}" for src, dst in private.items()], "--",
                "buildah", f"--root={self.dir / 'storage'}", f"--runroot={self.dir / 'run'}",
                "--storage-driver=overlay", *args]

    def run(self, *args: str, what: str, log: Path | None = None,
            timeout: float | None = None) -> str:
        env = {**os.environ, "TMPDIR": str(self.dir / "tmp")}
        if log is None:
            try:
                proc = subprocess.run(self.command(*args), capture_output=True, text=True,
                                      env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ImageError(f"{what} did not finish within {timeout:.0f}s") from None
            if proc.returncode != 0:
                raise ImageError(f"{what} failed: {proc.stderr.strip()[-2000:]}")
            return proc.stdout
        _timed(self.command(*args), what, log, env)
        return ""

    def exists(self, name: str) -> bool:
        proc = subprocess.run(self.command("inspect", "--type=image", name), capture_output=True,
                              env={**os.environ, "TMPDIR": str(self.dir / "tmp")})
        return proc.returncode == 0


def _timed(cmd: list[str], what: str, log: Path, env: dict | None = None,
           cwd: Path | None = None) -> None:
    """Run a long command with a progress line every 15 s; full output goes to ``log``."""
    start = time.monotonic()
    done = threading.Event()

    def ticker() -> None:
        while not done.wait(15):
            elapsed = int(time.monotonic() - start)
            _progress(f"  ... {what}: {elapsed // 60}m{elapsed % 60:02d}s")

    _progress(f"{what} (first time for these inputs; cached afterwards)")
    threading.Thread(target=ticker, daemon=True).start()
    try:
        with open(log, "ab") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    finally:
        done.set()
    if rc != 0:
        raise ImageError(f"{what} failed (exit {rc}); see {log}:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    elapsed = int(time.monotonic() - start)
    _progress(f"Done: {what} in {elapsed // 60}m{elapsed % 60:02d}s")


def _build_context(buildah: Buildah, name: str, context: Path, containerfile: str) -> Image:
    (context / "Containerfile").write_text(containerfile)
    buildah.run("bud", "--isolation=chroot", "--layers", f"--tag={name}",
                f"--file={context / 'Containerfile'}", str(context), what=f"building {name}",
                log=buildah.dir / "build.log")
    return Image(name)


def pause_image(buildah: Buildah) -> Image:
    name = f"localhost/kubetune/pause:{PAUSE_VERSION}"
    if buildah.exists(name):
        return Image(name)
    source = _module_file("build/pause/linux/pause.c")
    context = buildah.dir / "context-pause"
    context.mkdir(exist_ok=True)
    if not shutil.which("gcc"):
        raise ImageError("gcc is needed to compile the pause container (Debian package gcc)")
    subprocess.run(["gcc", "-Os", "-static", "-o", str(context / "pause"), str(source),
                    f'-DVERSION={PAUSE_VERSION}-kubetune'], check=True, capture_output=True)
    return _build_context(buildah, name, context, "FROM scratch\nCOPY pause /pause\n"
                          "USER 65535:65535\nENTRYPOINT [\"/pause\"]\n")


def _module_file(relative: str) -> Path:
    go = shutil.which("go")
    if not go:
        raise ImageError("the Go toolchain is missing (the pause source is in its module cache)")
    mod = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip()
    path = Path(mod) / f"k8s.io/kubernetes@{toolchain.KUBERNETES_VERSION}" / relative
    if not path.exists():
        raise ImageError(f"{path} is missing: run `kubetune dev-cluster build` first")
    return path


def coredns_image(buildah: Buildah) -> Image:
    name = f"localhost/kubetune/coredns:{toolchain.COREDNS_VERSION}"
    if buildah.exists(name):
        return Image(name)
    context = buildah.dir / "context-coredns"
    context.mkdir(exist_ok=True)
    shutil.copy2(toolchain.binary("coredns"), context / "coredns")
    return _build_context(buildah, name, context, "FROM scratch\nCOPY coredns /coredns\n"
                          "USER 65532:65532\nENTRYPOINT [\"/coredns\"]\n")


def python_base(buildah: Buildah) -> Image:
    key = hashlib.sha256(f"{DEBIAN_SUITE} {' '.join(BASE_PACKAGES)} v1".encode()).hexdigest()[:12]
    name = f"localhost/kubetune/python-base:{DEBIAN_SUITE}-{key}"
    if buildah.exists(name):
        return Image(name)
    if not shutil.which("debootstrap"):
        raise ImageError("debootstrap is missing (Debian package debootstrap)")
    context = buildah.dir / f"context-base-{key}"
    if not (context / "rootfs.tar").exists():
        _debootstrap(buildah, context)
    image = _build_context(buildah, name, context, (
        "FROM scratch\nADD rootfs.tar /\n"
        "ENV LANG=C.UTF-8 PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
        "/usr/bin:/sbin:/bin\n"
        "RUN python3 -m venv /opt/python && python --version\nCMD [\"python3\"]\n"))
    shutil.rmtree(context)
    return image


def _debootstrap(buildah: Buildah, context: Path) -> None:
    """A minimal Debian with Python, as ``context/rootfs.tar`` (written last)."""
    rootfs = context / "rootfs"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    _timed([sys.executable, "-m", "kubetune.devcluster.privatemounts",
            f"--scratch={buildah.dir / 'scratch'}", "--", "debootstrap", "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}", DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
           f"bootstrapping Debian {DEBIAN_SUITE} with Python (the images' base)",
           buildah.dir / "debootstrap.log")
    for junk in ("var/cache/apt", "var/lib/apt/lists"):
        for path in (rootfs / junk).glob("*"):
            if path.is_file():
                path.unlink()
    partial = context / "rootfs.tar.part"
    with tarfile.open(partial, "w") as tar:
        for entry in sorted(rootfs.iterdir()):
            tar.add(entry, arcname=entry.name,
                    filter=lambda info: None if info.name.split("/")[0] in ("dev", "proc", "sys")
                    and "/" in info.name else info)
    shutil.rmtree(rootfs)
    partial.rename(context / "rootfs.tar")


def wheels_dir() -> Path:
    """Every wheel this machine downloaded, kept once (``scripts/bootstrap.sh`` fills it too)."""
    return toolchain.cache_dir() / "wheels"


def _link_wheels(requirements: list[str], house: Path, log: Path, *flags: str) -> None:
    """Download what `requirements` need into `wheels_dir()` (files already there are kept, not
    fetched again), then hard-link exactly the resolved files into `house`."""
    store = wheels_dir()
    store.mkdir(parents=True, exist_ok=True)
    listing = house / "requirements.in"
    listing.write_text("\n".join(requirements) + "\n")
    pip = [sys.executable, "-m", "pip"]
    common = ["--only-binary=:all:", "-r", str(listing), *flags]
    _timed([*pip, "download", "--quiet", "-d", str(store), *common],
           "collecting the images' wheels (downloading only what this machine lacks)", log)
    report = house / "report.json"
    _timed([*pip, "install", "--quiet", "--dry-run", "--ignore-installed", "--no-index",
            "--find-links", str(store), "--report", str(report), *common],
           "resolving the images' wheels", log)
    for item in json.loads(report.read_text())["install"]:
        url = item["download_info"]["url"]
        if not url.startswith("file://"):
            raise RuntimeError(f"wheelhouse: {item['metadata']['name']} resolved to {url}, "
                               f"not a file in {store}")
        source = Path(url[len("file://"):])
        target = house / source.name
        if not target.exists():
            try:
                os.link(source, target)  # same file system: no copy of torch's 3 GB
            except OSError:
                shutil.copyfile(source, target)
    listing.unlink()
    report.unlink()


def wheelhouse() -> Path:
    """Every wheel the project images install, linked from this machine's wheel store."""
    key = _digest_paths([ROOT / p for p in DEPENDENCY_INPUTS], sys.version)
    house = images_dir() / f"wheelhouse-{key}"
    if (house / ".complete").exists():
        return house
    for old in images_dir().glob("wheelhouse-*"):
        shutil.rmtree(old, ignore_errors=True)
    house.mkdir(parents=True)

    def deps(*flags: str) -> list[str]:
        return sorted({line for extra in ("operator", "trainer") for line in subprocess.run(
            [sys.executable, str(ROOT / "docker" / "deps.py"), extra, *flags],
            capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()})

    log = images_dir() / "wheelhouse.log"
    constraints = str(ROOT / "constraints.txt")
    # setuptools + wheel: to build our own wheel in the image
    _link_wheels([*deps(), "setuptools>=69", "wheel"], house, log, "-c", constraints)
    data = deps("--no-deps")
    if data:  # data wheels, without their dependencies (pyproject's [tool.kubetune.no-deps])
        _link_wheels(data, house, log, "--no-deps")
    (house / "pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    (house / ".complete").write_text("")
    return house


def project_images(buildah: Buildah, base: Image,
                   targets: tuple[str, ...] = PROJECT_TARGETS) -> dict[str, Image]:
    key = _digest_paths([ROOT / p for p in PROJECT_INPUTS], base.name)
    out = {t: Image(f"localhost/kubetune/{t}:{key}") for t in targets}
    todo = [t for t in targets if not buildah.exists(out[t].name)]
    if not todo:
        return out
    house = wheelhouse()
    _clear_leftovers(buildah)  # an interrupted build leaves containers and layer tars (GBs)
    try:
        for target in todo:
            buildah.run("bud", "--isolation=chroot", "--layers", f"--target={target}",
                        f"--build-arg=PYTHON_IMAGE={base.name}", f"--volume={house}:/wheels:ro",
                        f"--volume={house / 'pip.conf'}:/etc/pip.conf:ro",
                        f"--tag={out[target].name}", str(ROOT),
                        what=f"building the {target} image", log=buildah.dir / "build.log")
    except ImageError:
        _clear_leftovers(buildah)
        raise
    _prune(buildah, set(out.values()))
    return out


def _clear_leftovers(buildah: Buildah) -> None:
    """Working containers and temporary layer files of earlier, unfinished builds."""
    try:
        buildah.run("rm", "--all", what="removing left-over build containers")
    except ImageError as exc:
        _progress(f"(could not remove left-over build containers: {exc})")
    for leftover in (buildah.dir / "tmp").iterdir():
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _prune(buildah: Buildah, keep: set[Image]) -> None:
    """Drop earlier builds of the project images (their code layers; the dependency layers
    they share with the new ones stay)."""
    try:
        buildah.run("rm", "--all", what="removing left-over build containers")
        listed = buildah.run("images", "--format", "{{.Name}}:{{.Tag}}", what="listing images")
        repos = {i.repository for i in keep}
        names = {i.name for i in keep}
        stale = [n for n in listed.split() if n.rsplit(":", 1)[0] in repos and n not in names]
        if stale:
            buildah.run("rmi", *stale, what="removing earlier builds")
    except ImageError as exc:  # disk hygiene only: never fail an `up` for it
        _progress(f"(could not prune earlier image builds: {exc})")


REGISTRY_ENV = {"OTEL_TRACES_EXPORTER": "none", "OTEL_SDK_DISABLED": "true"}
# Deadlines (seconds). A first push of the 6.7 GB trainer image takes ~3 min on 2 cores.
PUSH_TIMEOUT = 1800
PULL_TIMEOUT = 1800
GC_TIMEOUT = 600


def start_registry(host: str, logs: Path) -> tuple[procs.Proc, str]:
    """The CNCF distribution registry on ``host`` (where both buildah and the node's containerd
    reach it), its storage in kubetune's cache: an image pushed once is never pushed again."""
    storage = registry_storage()
    storage.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    config = logs.parent / "registry.yaml"
    config.write_text(json.dumps({
        "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)},
                    "delete": {"enabled": True}, "redirect": {"disable": True}},
        "http": {"addr": f"{host}:{port}"}}))
    proc = procs.start("registry", [str(toolchain.binary("registry")), "serve", str(config)],
                       logs / "registry.log", env={**os.environ, **REGISTRY_ENV})
    procs.wait_port(port, proc, timeout=30, host=host)
    return proc, f"{host}:{port}"


def collect_garbage(config: Path, keep: list[str], log: Path) -> None:
    """With the registry stopped: untag earlier builds of the images in ``keep`` and drop the
    layers nothing references any more (each dependency change would otherwise leave
    gigabytes behind)."""
    repositories = registry_storage() / "docker" / "registry" / "v2" / "repositories"
    untagged = False
    for name in keep:
        repo, tag = name.split("/", 1)[1].rsplit(":", 1)
        tags = repositories / repo / "_manifests" / "tags"
        for old in tags.iterdir() if tags.is_dir() else []:
            if old.name != tag:
                shutil.rmtree(old)
                untagged = True
    if untagged and config.exists():
        with open(log, "ab") as out:
            try:
                subprocess.run([str(toolchain.binary("registry")), "garbage-collect",
                                "--delete-untagged", str(config)], stdout=out,
                               stderr=subprocess.STDOUT, env={**os.environ, **REGISTRY_ENV},
                               timeout=GC_TIMEOUT)
            except subprocess.TimeoutExpired:  # disk hygiene only: `down` goes on
                out.write(f"garbage-collect did not finish within {GC_TIMEOUT}s\n".encode())


def push(buildah: Buildah, image: Image, registry: str) -> None:
    """Push an image (layers the registry holds already are skipped: a code change sends one
    small layer). Uncompressed: nothing to gain from gzip on one machine."""
    buildah.run("push", "--quiet", "--disable-compression", "--tls-verify=false", image.name,
                f"docker://{registry}/{image.name.split('/', 1)[1]}",
                what=f"pushing {image.name}", timeout=PUSH_TIMEOUT)


def write_registry_hosts(directory: Path, registry: str) -> Path:
    """containerd's host configuration: ``localhost/…`` images come from our registry."""
    hosts = registry_hosts(directory)
    (hosts / "localhost").mkdir(parents=True, exist_ok=True)
    (hosts / "localhost" / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n'
        f'  capabilities = ["pull", "resolve"]\n')
    return hosts
