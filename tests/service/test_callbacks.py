"""Job callbacks (app.callbacks) to a real HTTP receiver on loopback: the final state is POSTed once,
signed with the owner's key, tried again after a failure, given up after TARQ_CALLBACK_ATTEMPTS, and
refused at submission when the URL cannot be a callback."""
from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import http.server
import json
import re
import socket
import ssl
import threading
import time

import pytest

from app import callbacks, jobs
from tests.service.test_api import error_of


class Receiver:
    """Records each POST (headers, body) and answers the next of `codes` (then 200); on `host`:`port`,
    over TLS with `tls` (an ssl.SSLContext) recording the server name each client asked for."""

    def __init__(self, codes=(), host="127.0.0.1", port=0, tls=None):
        self.calls: list[tuple[dict, bytes]] = []
        self.codes = list(codes)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                self.send_response(receiver.codes.pop(0) if receiver.codes else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}/hook"
        self.server_names: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver():
    made = []

    def make(codes=(), **kw):
        made.append(Receiver(codes, **kw))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()


@pytest.fixture
def hooked(make_client, make_settings, database_url):
    settings = make_settings(database_url=database_url, callback_private_ok=True, callback_retry_seconds=0.2,
                             callback_attempts=3)
    return make_client(settings), settings


def end(engine, job_id: str, status: str = jobs.SUCCEEDED) -> None:
    """What a worker does to a job, without one."""
    jobs.claim(engine, job_id, "w", 60)
    jobs.transition(engine, job_id, status, model_id="m-1" if status == jobs.SUCCEEDED else None)


def test_a_finished_job_is_posted_once_signed_with_the_owners_key(hooked, engine, receiver):
    client, settings = hooked
    r = receiver()
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": r.url})
    assert job.status_code == 202, job.text
    job = job.json()
    assert job["callback"] == {"url": r.url, "status": "waiting", "attempts": 0, "error": None}
    assert callbacks.deliver_due(engine, settings) == {}  # still queued: nothing to say yet
    end(engine, job["id"])
    assert callbacks.deliver_due(engine, settings) == {job["id"]: "delivered"}
    assert callbacks.deliver_due(engine, settings) == {}  # once
    [(headers, body)] = r.calls
    sent = json.loads(body)
    assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["model"] == "m-1"
    api_key = client.headers["Authorization"].removeprefix("Bearer ")
    key = hashlib.sha256(api_key.encode()).hexdigest().encode()
    assert headers["X-Tarq-Signature"] == "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert headers["X-Tarq-Delivery"] == f"{job['id']}/1"
    assert client.get(f"/v1/quantizations/{job['id']}").json()["callback"]["status"] == "delivered"


def test_a_failed_try_is_repeated_later_then_given_up(hooked, engine, receiver, clips):
    client, settings = hooked
    flaky, dead = receiver([500]), receiver([503, 503, 503])
    made = []
    for r in (flaky, dead):
        files = [("files", (clips[0].name, clips[0].read_bytes(), "audio/flac"))]
        made.append(client.post("/v1/evaluations", data={"model": "tiny-whisper", "callback_url": r.url},
                                files=files + [("transcripts", ("t.tsv", f"{clips[0].name}\tx\n".encode(), "text/plain"))]
                                ).json()["id"])
        end(engine, made[-1], jobs.FAILED)
    assert callbacks.deliver_due(engine, settings) == {made[0]: "pending", made[1]: "pending"}
    assert callbacks.deliver_due(engine, settings) == {}  # the retry waits callback_retry_seconds
    shown = client.get(f"/v1/evaluations/{made[0]}").json()["callback"]
    assert shown["attempts"] == 1 and shown["error"] == "the receiver answered 500"
    deadline = time.monotonic() + 10
    states = {}
    while time.monotonic() < deadline and set(states.values()) != {"delivered", "failed"}:
        time.sleep(0.1)
        states.update(callbacks.deliver_due(engine, settings))
    assert states == {made[0]: "delivered", made[1]: "failed"}
    assert len(flaky.calls) == 2 and len(dead.calls) == 3  # callback_attempts
    assert [h["X-Tarq-Delivery"] for h, _ in dead.calls] == [f"{made[1]}/{n}" for n in (1, 2, 3)]
    assert client.get(f"/v1/evaluations/{made[1]}").json()["callback"]["status"] == "failed"


def test_a_cancelled_queued_job_is_reported_and_two_senders_send_once(hooked, engine, receiver):
    client, settings = hooked
    r = receiver()
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": r.url}
                      ).json()
    assert client.delete(f"/v1/quantizations/{job['id']}").json()["status"] == "cancelled"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: callbacks.deliver(engine, settings, job["id"]), range(4)))
    assert sorted(results, key=str) == [None, None, None, "delivered"]
    assert len(r.calls) == 1 and json.loads(r.calls[0][1])["status"] == "cancelled"


@pytest.fixture
def rebinding(monkeypatch):
    """DNS that answers `rebind.test` with the addresses in `answers`, one list per lookup, the last
    one for every lookup after it (a real rebinding name server cannot run here); other names resolve."""
    real = socket.getaddrinfo
    answers: list[list[str]] = []

    def getaddrinfo(host, port, *args, **kw):
        if host != "rebind.test":
            return real(host, port, *args, **kw)
        found = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port)) for a in found]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_a_try_connects_to_the_address_its_check_resolved(hooked, engine, receiver, rebinding):
    """The name resolves to the receiver when checked and elsewhere a moment later: the POST still goes to
    the checked address, with the URL's name in Host."""
    client, settings = hooked
    good = receiver()
    other = receiver(host="127.0.0.2", port=good.port)
    url = f"http://rebind.test:{good.port}/hook"
    rebinding[:] = [["127.0.0.1"]]
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": url})
    assert job.status_code == 202, job.text
    end(engine, job.json()["id"])
    rebinding[:] = [["127.0.0.1"], ["127.0.0.2"]]  # the check's lookup, then every later one
    assert callbacks.deliver_due(engine, settings) == {job.json()["id"]: "delivered"}
    assert other.calls == [] and len(good.calls) == 1
    assert good.calls[0][0]["Host"] == f"rebind.test:{good.port}"


def test_an_unreachable_first_address_falls_to_the_next_checked_one(hooked, engine, receiver, rebinding):
    client, settings = hooked
    good = receiver(host="127.0.0.2")
    rebinding[:] = [["127.0.0.3", "127.0.0.2"]]  # nothing listens on 127.0.0.3
    url = f"http://rebind.test:{good.port}/hook"
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": url})
    end(engine, job.json()["id"])
    assert callbacks.deliver_due(engine, settings) == {job.json()["id"]: "delivered"}
    assert len(good.calls) == 1


def test_https_keeps_the_name_for_the_server_name_and_the_certificate(hooked, engine, receiver, rebinding,
                                                                      tmp_path, monkeypatch):
    """Connected by address, the TLS handshake still asks for rebind.test and checks the certificate
    against it (the certificate names rebind.test alone: checked against 127.0.0.1 it would fail)."""
    client, settings = hooked
    cert, key = _self_signed("rebind.test", tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx trusts it (trust_env)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = receiver(tls=tls)
    rebinding[:] = [["127.0.0.1"]]
    url = f"https://rebind.test:{server.port}/hook"
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": url})
    end(engine, job.json()["id"])
    assert callbacks.deliver_due(engine, settings) == {job.json()["id"]: "delivered"}
    assert server.server_names == ["rebind.test"] and len(server.calls) == 1
    assert server.calls[0][0]["Host"] == f"rebind.test:{server.port}"


def _self_signed(name: str, folder):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("url,words", [
    ("ftp://example.com/x", "not an http(s) URL"),
    ("http://127.0.0.1:9/hook", "private, loopback or link-local"),
    ("http://169.254.169.254/latest/meta-data", "private, loopback or link-local"),
    ("http://tarq-no-such-host.invalid/hook", "does not resolve"),
])
def test_a_url_that_cannot_be_a_callback_is_refused(client, settings, url, words):
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn",
                                                          "callback_url": url}), 422)
    assert err["param"] == "callback_url" and words in err["message"], err
    assert client.get("/v1/quantizations").json()["data"] == []


@pytest.mark.slow
def test_tarq_serve_calls_back_from_the_worker_and_again_from_the_api(subprocess_env, tmp_path, receiver):
    """A real `tarq serve`: the worker that ends the job tries the callback at once; the receiver answers
    500, and the API's sweep tries again after TARQ_CALLBACK_RETRY_SECONDS, which it takes."""
    import httpx

    from tests.service.conftest import free_port, stop, tarq_command, wait_http
    from tests.service.test_e2e import run_logged, tail

    r = receiver([500])
    env = dict(subprocess_env, TARQ_API_KEYS="cb-key", TARQ_CALLBACK_PRIVATE_OK="1", TARQ_CALLBACK_RETRY_SECONDS="1")
    port = free_port()
    proc, log = run_logged(tarq_command("serve", "--port", str(port)), env, tmp_path / "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer cb-key"})
        job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": r.url})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 180
        while len(r.calls) < 2:
            assert time.monotonic() < deadline, tail(tmp_path / "serve.log")
            time.sleep(0.2)
        bodies = [json.loads(body) for _, body in r.calls]
        assert [b["status"] for b in bodies] == ["succeeded", "succeeded"] and bodies[0]["model"]
        assert [h["X-Tarq-Delivery"] for h, _ in r.calls] == [f"{job.json()['id']}/1", f"{job.json()['id']}/2"]
        shown = client.get(f"/v1/quantizations/{job.json()['id']}").json()["callback"]
        assert shown["status"] == "delivered" and shown["attempts"] == 2
    finally:
        stop(proc)
        log.close()
    logged = (tmp_path / "serve.log").read_text()
    job_id = job.json()["id"]
    assert re.search(rf"ForkPoolWorker-\d+\] callback of job {job_id}: pending \(the receiver answered 500\)", logged)
    assert re.search(rf"INFO tarq.api \[-\] callback of job {job_id}: delivered", logged)
