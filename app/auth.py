"""API keys: `Authorization: Bearer <key>` on every route but health.

Keys are held only as sha256 hashes and compared with hmac.compare_digest against each of them, so
neither the stored form nor the timing reveals a key. With no key configured every request is
refused: a fresh server never runs open (`tarq serve` generates a key first).
"""
from __future__ import annotations

import hmac
import os
import re
import secrets
from pathlib import Path

from app.schemas import ApiError
from app.settings import Settings, hash_key

BEARER = "bearer "


# (method, path) a `transcribe` key may use: the audio routes, and the model list and records (not
# their files: weights are the valuable part)
TRANSCRIBE_ROUTES = (("POST", re.compile(r"/v1/audio/(transcriptions|translations)/?")),
                     ("GET", re.compile(r"/v1/models(/[^/]+)?/?")))


def check_key(authorization: str | None, settings: Settings, method: str | None = None,
              path: str | None = None) -> str:
    """Return the sha256 of the presented key if it is valid; raise ApiError(401) otherwise. Given the
    route (`method`, `path`), also raise ApiError(403) when the key's role does not cover it."""
    roles = settings.key_roles()
    if not roles:
        raise ApiError(401, "this server has no API key configured; set TARQ_API_KEYS or start it with "
                            "`tarq serve`, which writes one to <data dir>/api_key", code="no_api_key")
    if not authorization or not authorization.lower().startswith(BEARER):
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    presented = hash_key(authorization[len(BEARER):].strip())
    match = False
    for known in roles:  # no early exit: the time taken does not depend on which key matched
        match |= hmac.compare_digest(presented, known)
    if not match:
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    role = roles[presented]
    if method is None or role == "all" or any(method == m and rx.fullmatch(path) for m, rx in TRANSCRIBE_ROUTES):
        return presented
    raise ApiError(403, f"this API key may only transcribe, translate and list models (role {role!r} in "
                        f"TARQ_API_KEYS); {method} {path} needs a key without a role", code="insufficient_role")


def ensure_api_key(settings: Settings) -> Path | None:
    """If no key is configured, create one in <data dir>/api_key (mode 0600) and return its path;
    return the path of an existing generated key; None when TARQ_API_KEYS is set."""
    if settings.api_keys.strip():
        return None
    path = settings.api_key_file
    if path.is_file() and path.read_text().strip():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "tarq-" + secrets.token_urlsafe(32)
    # O_EXCL + 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path
