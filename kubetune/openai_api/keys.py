"""API keys: Secrets labelled `kubetune.io/api-key: "true"` in the server's key namespace, each
holding `key` (the bearer token) and `namespace` (the one namespace the key acts in).

Keys are compared as SHA-256 digests with hmac.compare_digest, against every entry, so the
time an answer takes says nothing about how much of a key was right or which entry matched."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
import time
from typing import Callable, Iterable

LABEL = "kubetune.io/api-key"
SELECTOR = f"{LABEL}=true"
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MIN_KEY_CHARS = 16
CACHE_SECONDS = 10.0

Entry = tuple[bytes, str]  # (sha256 of the key, namespace)


def entries(secrets: Iterable[dict]) -> list[Entry]:
    """The usable keys of Secrets as the apiserver returns them (data base64-encoded). A
    Secret with a short key or a malformed namespace is skipped, never half-used."""
    out = []
    for secret in secrets:
        data = secret.get("data") or {}
        try:
            key = base64.b64decode(data.get("key") or "").decode()
            namespace = base64.b64decode(data.get("namespace") or "").decode().strip()
        except (ValueError, UnicodeDecodeError):
            continue
        key = key.strip()
        if len(key) >= MIN_KEY_CHARS and len(namespace) <= 63 and NAMESPACE.match(namespace):
            out.append((hashlib.sha256(key.encode()).digest(), namespace))
    return out


def namespace_for(token: str, known: list[Entry]) -> str | None:
    digest = hashlib.sha256(token.encode()).digest()
    found = None
    for entry_digest, namespace in known:
        if hmac.compare_digest(digest, entry_digest) and found is None:
            found = namespace
    return found


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyRing:
    """The keys, re-read from the Secrets at most every CACHE_SECONDS (a revoked key stops
    working within that time; a new one starts working within it)."""

    def __init__(self, load: Callable[[], list[dict]], ttl: float = CACHE_SECONDS):
        self._load, self._ttl = load, ttl
        self._known: list[Entry] = []
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def namespace(self, token: str | None) -> str | None:
        if not token:
            return None
        with self._lock:
            if time.monotonic() - self._read_at > self._ttl:
                self._known = entries(self._load())
                self._read_at = time.monotonic()
            known = self._known
        return namespace_for(token, known)
