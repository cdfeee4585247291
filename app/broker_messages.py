"""kombu's JSON envelope of a Celery message (protocol 2), as the filesystem transport's queue files and
Redis's held (unacknowledged) entries both store it: {"body", "headers": {"id", "task", ...},
"properties": {"body_encoding", ...}}, the body being [args, kwargs, embed]."""
from __future__ import annotations

import base64
import json


def parts(payload: dict) -> tuple[dict, list]:
    """(headers, args) of one message; ValueError (or KeyError, IndexError, TypeError) when it is not one."""
    body = payload["body"]
    if payload.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return payload["headers"], json.loads(body)[0]
