"""Real S3 (SeaweedFS): multipart transfers and refused credentials."""

import hashlib
import os

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

pytestmark = pytest.mark.cluster


def test_fifty_megabyte_multipart_round_trip(s3_client, s3_server, tmp_path):
    payload = os.urandom(50 * 1024 * 1024)
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
    s3_client.upload_file(str(src), s3_server.bucket, "tests/blob.bin", Config=config)

    head = s3_client.head_object(Bucket=s3_server.bucket, Key="tests/blob.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-7")  # 50 MiB in 8 MiB parts: a multipart upload

    dst = tmp_path / "back.bin"
    s3_client.download_file(s3_server.bucket, "tests/blob.bin", str(dst), Config=config)
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("access_key,secret_key,code", [
    (None, "wrong-secret", "SignatureDoesNotMatch"),
    ("nobody", "whatever", "InvalidAccessKeyId"),
])
def test_wrong_credentials_are_refused(s3_server, access_key, secret_key, code):
    bad = boto3.client("s3", endpoint_url=s3_server.endpoint,
                       aws_access_key_id=access_key or s3_server.access_key,
                       aws_secret_access_key=secret_key, region_name=s3_server.region)
    with pytest.raises(ClientError) as err:
        bad.put_object(Bucket=s3_server.bucket, Key="tests/denied", Body=b"x")
    assert err.value.response["Error"]["Code"] == code


def test_a_port_taken_before_seaweedfs_binds_it_is_replaced(tmp_path, monkeypatch):
    """Ports are chosen free, then bound by SeaweedFS a moment later: one taken meanwhile (by
    another process's connection) makes a fresh server start again on new ports, not fail."""
    import socket

    from kubetune.devcluster import procs, s3

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    chosen = []
    real = procs.free_ports

    def first_collides(count):
        ports = real(count)
        if not chosen:
            ports[s3.PORT_FLAGS.index("s3.port")] = taken.getsockname()[1]
        chosen.append(ports)
        return ports
    monkeypatch.setattr(procs, "free_ports", first_collides)
    proc, info = s3.start(tmp_path / "s3")
    try:
        # At least one more choice (SeaweedFS may also need a third: seen once, not explained)
        assert len(chosen) >= 2 and str(taken.getsockname()[1]) not in info.endpoint
        client = boto3.client("s3", endpoint_url=info.endpoint, region_name=info.region,
                              aws_access_key_id=info.access_key,
                              aws_secret_access_key=info.secret_key)
        client.put_object(Bucket=info.bucket, Key="after-retry", Body=b"ok")
        assert client.get_object(Bucket=info.bucket, Key="after-retry")["Body"].read() == b"ok"
    finally:
        procs.stop(proc)
        taken.close()
