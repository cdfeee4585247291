"""The API's own log lines and the request id that ties them to a response.

Every response carries `X-Request-ID` (OpenAI's clients read it as the request id): the client's own when it
sent a sane one, else a new `req_...`. The API's log lines name it, so that an operator handed the id of a
failed request finds what happened. uvicorn configures only its own loggers, and run as
`uvicorn --factory app.main:create_app` nobody else configures ours: `setup()` gives the `tarq` logger a
handler unless something already did. Records still propagate: a host that configures the root logger
itself gets them too (and should then leave `tarq` without a handler of its own).
"""
from __future__ import annotations

import contextvars
import logging
import re
import secrets
import sys

HEADER = "X-Request-ID"
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def request_id(sent: str | None) -> str:
    """The client's id when it is short and plain (it ends up in logs), else a new one."""
    return sent if sent and _SANE.fullmatch(sent) else f"req_{secrets.token_hex(12)}"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def setup(level: int = logging.INFO) -> None:
    logger = logging.getLogger("tarq")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter())
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
