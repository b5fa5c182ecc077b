"""The dev cluster's Git server (what Flux clones from): a real `git clone` over smart HTTP
gets the commits; pushes are refused; an oversized request body is refused unread."""

import subprocess
import threading
import urllib.error
import urllib.request
from wsgiref.simple_server import make_server

import pytest

from kubetune.devcluster import gitserver

pytestmark = pytest.mark.unit


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "git"
    root.mkdir()
    bare = root / "apps.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "a.yaml").write_text("kind: X\n")
    for args in (["add", "a.yaml"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit",
                                     "-q", "-m", "one"], ["push", "-q", str(bare), "main"]):
        subprocess.run(["git", "-C", str(work), *args], check=True)
    server = make_server("127.0.0.1", 0, gitserver.app_for(str(root), gitserver.backend()),
                         server_class=gitserver._Server, handler_class=gitserver._Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", tmp_path
    server.shutdown()
    server.server_close()


def test_clone_over_http_and_no_push(served):
    url, tmp = served
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", f"{url}/apps.git", str(clone)], check=True,
                   timeout=60)
    assert (clone / "a.yaml").read_text() == "kind: X\n"
    (clone / "b.yaml").write_text("kind: Y\n")
    subprocess.run(["git", "-C", str(clone), "add", "b.yaml"], check=True)
    subprocess.run(["git", "-C", str(clone), "-c", "user.email=t@t", "-c", "user.name=t",
                    "commit", "-q", "-m", "two"], check=True)
    push = subprocess.run(["git", "-C", str(clone), "push", "-q", "origin", "main"],
                          capture_output=True, text=True, timeout=60)
    assert push.returncode != 0  # read-only: repositories are written on the machine
    missing = subprocess.run(["git", "ls-remote", f"{url}/nope.git"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode != 0


def test_an_oversized_body_is_refused_unread(served):
    url, _ = served
    request = urllib.request.Request(f"{url}/apps.git/git-upload-pack", method="POST",
                                     data=b"x", headers={
                                         "Content-Length": str(gitserver.MAX_BODY + 1),
                                         "Content-Type": "application/x-git-upload-pack-request"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 413
