"""A read-only Git server over smart HTTP for the dev cluster (Flux clones from it): Git's own
`git http-backend` behind a small threaded WSGI server on loopback.

    python -m kubetune.devcluster.gitserver ROOT PORT

serves every bare repository under ROOT at http://127.0.0.1:PORT/<name>.git (clone and fetch;
pushes are refused: repositories are written on this machine with `git` itself). Request
bodies are capped and each backend call has a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

MAX_BODY = 16 * 1024 * 1024  # a fetch's negotiation is kilobytes
BACKEND_DEADLINE = 60.0  # seconds per request


def backend() -> str:
    exec_path = subprocess.check_output(["git", "--exec-path"], text=True).strip()
    return os.path.join(exec_path, "git-http-backend")


def app_for(root: str, program: str):
    def app(environ, start_response):
        if environ.get("REQUEST_METHOD") == "POST" and \
                environ.get("PATH_INFO", "").endswith("/git-receive-pack"):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"read-only\n"]
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            start_response("413 Payload Too Large", [("Content-Type", "text/plain")])
            return [b"request body too large\n"]
        body = environ["wsgi.input"].read(length) if length else b""
        env = {k: v for k, v in environ.items() if isinstance(v, str) and k.isupper()}
        env.update(GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1",
                   PATH=os.environ.get("PATH", "/usr/bin:/bin"))
        if "HTTP_GIT_PROTOCOL" in environ:
            env["GIT_PROTOCOL"] = environ["HTTP_GIT_PROTOCOL"]
        try:
            done = subprocess.run([program], input=body, env=env, capture_output=True,
                                  timeout=BACKEND_DEADLINE)
        except subprocess.TimeoutExpired:
            start_response("504 Gateway Timeout", [("Content-Type", "text/plain")])
            return [b"git http-backend took too long\n"]
        head, sep, out = done.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, out = done.stdout.partition(b"\n\n")
        status, headers = "200 OK", []
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = value.strip()
            elif key:
                headers.append((key, value.strip()))
        if not sep:
            status, headers, out = "500 Internal Server Error", [
                ("Content-Type", "text/plain")], done.stderr[-4000:]
        headers.append(("Content-Length", str(len(out))))
        start_response(status, headers)
        return [out]
    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Handler(WSGIRequestHandler):
    def log_message(self, fmt, *args):  # noqa: D401 - one line per request on stderr
        sys.stderr.write("git-http: " + (fmt % args) + "\n")


def main(argv: list[str]) -> None:
    root, port = os.path.abspath(argv[0]), int(argv[1])
    server = make_server("127.0.0.1", port, app_for(root, backend()), server_class=_Server,
                         handler_class=_Handler)
    server.serve_forever()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
