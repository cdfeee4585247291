"""Job callbacks (webhooks): once a job with a `callback_url` ends, its public JSON (the body GET on the
job answers) is POSTed there, signed, and tried again with growing waits until the receiver answers 2xx or
TARQ_CALLBACK_ATTEMPTS are used.

`X-Tarq-Signature: sha256=<hex>` is the HMAC-SHA256 of the body keyed with the hex sha256 of the API key
that submitted the job, so its owner can check that the call is the server's (`hmac.new(sha256(key).
hexdigest().encode(), body, "sha256")`). `X-Tarq-Delivery` names the job and the try.

The worker that ends a job delivers at once (`deliver`); every API process sends what is due every
CALLBACK_SWEEP_SECONDS (`deliver_due`, from a loop beside the reaper's): jobs the API ended (a cancel, a
lost worker's last attempt), tries after a failure, and claims left by a process that died mid-send. A claim is one guarded UPDATE, so two senders never both try.
A URL is checked when the job is submitted and again before each try (its name may resolve elsewhere by
then): http(s) only, and no private, loopback or link-local address unless TARQ_CALLBACK_PRIVATE_OK. A try
connects to an address that check resolved, never to what the name resolves to a moment later (DNS
rebinding): the Host header and, over https, the TLS server name and certificate check keep the URL's name.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy import and_, or_, select, update

from app import jobs
from app.db import jobs as table
from app.schemas import ApiError

log = logging.getLogger("tarq.api")
SIGNATURE_HEADER = "X-Tarq-Signature"
DELIVERY_HEADER = "X-Tarq-Delivery"
PENDING, SENDING, DELIVERED, FAILED = "pending", "sending", "delivered", "failed"
CLAIM_SECONDS = 120.0  # a claim older than this was left by a sender that died: taken over


class BadCallback(ValueError):
    pass


def check_url(url: str, private_ok: bool) -> str:
    """The URL if a callback may go there; BadCallback saying why not."""
    return resolve(url, private_ok)[0]


def resolve(url: str, private_ok: bool) -> tuple[str, list[str]]:
    """(the URL, the addresses its host resolves to, every one checked); BadCallback saying why not."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadCallback(f"callback_url {url!r} is not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, ValueError) as err:
        raise BadCallback(f"callback_url host {parts.hostname!r} does not resolve: {err}") from None
    addresses: list[str] = []
    for *_, address in found:
        ip = ipaddress.ip_address(address[0].split("%")[0])
        if not private_ok and not ip.is_global:
            raise BadCallback(f"callback_url host {parts.hostname!r} is a private, loopback or link-local "
                              f"address ({ip}); TARQ_CALLBACK_PRIVATE_OK=1 allows it")
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return url.strip(), addresses


def checked(url: str | None, settings) -> str | None:
    """A submission's callback_url, checked (ApiError 422 naming the field), or None."""
    if not url or not url.strip():
        return None
    try:
        return check_url(url, settings.callback_private_ok)
    except BadCallback as err:
        raise ApiError(422, str(err), param="callback_url", code="bad_callback_url") from None


def signature(body: bytes, owner: str) -> str:
    return "sha256=" + hmac.new(owner.encode(), body, hashlib.sha256).hexdigest()


def _due(now):
    """Ended jobs whose callback is to be sent now: never tried, a retry whose time has come, or a claim
    whose sender died."""
    stale = now - timedelta(seconds=CLAIM_SECONDS)
    return and_(table.c.callback_url.is_not(None), table.c.status.in_(tuple(jobs.TERMINAL)),
                or_(table.c.callback_status.is_(None),
                    and_(table.c.callback_status == PENDING, table.c.callback_at <= now),
                    and_(table.c.callback_status == SENDING, table.c.callback_at < stale)))


def _claim(engine, job_id: str) -> dict | None:
    now = jobs.now()
    with engine.begin() as conn:
        claimed = conn.execute(update(table).where(table.c.id == job_id, _due(now))
                               .values(callback_status=SENDING, callback_at=now)).rowcount
    return jobs.get_job(engine, job_id) if claimed else None


def _send(job: dict, settings) -> str | None:
    """One try; None when the receiver took it, else why not."""
    import httpx

    body = json.dumps(jobs.public_job(job)).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(body, job["owner"]),
               DELIVERY_HEADER: f"{job['id']}/{job['callback_attempts'] + 1}", "User-Agent": "tarq-callback"}
    try:
        url, addresses = resolve(job["callback_url"], settings.callback_private_ok)
        answer = _post_pinned(url, addresses, body, headers, settings.callback_timeout_seconds)
    except BadCallback as err:
        return str(err)
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"[:500]
    return None if answer.is_success else f"the receiver answered {answer.status_code}"


def _post_pinned(url: str, addresses: list[str], body: bytes, headers: dict, timeout: float):
    """POST to `url` at one of `addresses` (the next on a failed connect), as if to its name."""
    import httpx

    target = httpx.URL(url)
    headers = {**headers, "Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for k, address in enumerate(addresses):
            request = client.build_request("POST", target.copy_with(host=address), content=body, headers=headers,
                                           extensions=extensions)
            try:
                return client.send(request)
            except httpx.ConnectError:
                if k == len(addresses) - 1:
                    raise
    raise BadCallback(f"callback_url host {target.host!r} resolves to no address")


def deliver(engine, settings, job_id: str) -> str | None:
    """Try the job's callback now if it is due and no one else is sending it; returns its status after
    the try (None when there was nothing to do)."""
    job = _claim(engine, job_id)
    if job is None:
        return None
    error = _send(job, settings)
    attempts = job["callback_attempts"] + 1
    if error is None:
        status, values = DELIVERED, {"callback_error": None}
    elif attempts < settings.callback_attempts:
        wait = settings.callback_retry_seconds * 2 ** (attempts - 1)
        status, values = PENDING, {"callback_error": error, "callback_at": jobs.now() + timedelta(seconds=wait)}
    else:
        status, values = FAILED, {"callback_error": error}
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == job_id, table.c.callback_status == SENDING)
                     .values(callback_status=status, callback_attempts=attempts, **values))
    (log.info if error is None else log.warning)("callback of job %s: %s%s", job_id, status,
                                                 f" ({error})" if error else "")
    return status


def deliver_due(engine, settings) -> dict[str, str]:
    """Send every callback that is due; returns {job id: status after the try}."""
    with engine.connect() as conn:
        ids = list(conn.scalars(select(table.c.id).where(_due(jobs.now())).order_by(table.c.finished_at)))
    done = {}
    for job_id in ids:
        status = deliver(engine, settings, job_id)
        if status is not None:
            done[job_id] = status
    return done
