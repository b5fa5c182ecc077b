"""Leader election when the apiserver hangs: a Lease call that never answers cannot keep a
leader leading past its renew deadline, which ends before the lease could pass to a standby.
The "apiserver" here is a real TCP listener that accepts and never answers."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kubernetes import client

from kubetune_operator.leader import LeaderElector

pytestmark = pytest.mark.unit


@pytest.fixture
def hung_apiserver():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # never read, never answered
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{listener.getsockname()[1]}"
    yield client.ApiClient(config)
    stop.set()
    for conn in held:
        conn.close()
    listener.close()


def test_a_hung_lease_call_times_out(hung_apiserver):
    elector = LeaderElector(hung_apiserver, "ns", "lease", "me", lease_seconds=3,
                            renew_seconds=0.5)
    start = time.monotonic()
    with pytest.raises(Exception):
        elector._try()
    # the client's urllib3 retries a timed-out read three times: four timeouts at most
    assert time.monotonic() - start < 4 * elector.request_timeout + 1


def test_the_leader_gives_up_before_its_lease_could_expire(hung_apiserver):
    gave_up = threading.Event()
    elector = LeaderElector(hung_apiserver, "ns", "lease", "me", lease_seconds=3,
                            renew_seconds=0.5, on_lost=gave_up.set)
    elector._renewed_from = time.monotonic()  # as if the last renewal had just succeeded
    start = time.monotonic()
    elector.keep()
    assert gave_up.wait(5)
    took = time.monotonic() - start
    assert elector.renew_deadline <= took < elector.lease_seconds, took
