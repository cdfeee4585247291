"""schemathesis against the app's own OpenAPI schema: every operation, with a valid key and without,
must never answer 5xx. In-process (ASGI) on create_app() with a temporary SQLite data dir and the
embedded (filesystem) broker that nobody consumes: accepted submissions just queue."""
from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")  # dev extra: schemathesis==4.32.5 (brings hypothesis)
from hypothesis import HealthCheck, settings

from app.main import create_app

KEY = "fuzz-key-" + "0" * 16
EXAMPLES = int(os.environ.get("TARQ_FUZZ_EXAMPLES", "15"))  # per operation and generation; CI keeps 15
SEEN: dict[str, list[int]] = {}  # status codes seen, per operation (for a look with -s)
OPEN = {"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json"}

# The schema comes from the app itself: /openapi.json is open, so no settings are needed to read it.
# (schemathesis' own pytest plugin does not run under pytest 9, so hypothesis drives the cases here.)
APP = create_app()
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, model_root):
    from app.settings import Settings, get_settings

    data = tmp_path_factory.mktemp("fuzz") / "data"
    conf = Settings(data_dir=data, api_keys=KEY, model_roots=str(model_root), hub_offline=True,
                    transcribe_wait_seconds=0.5, rate_limit_per_minute=0, max_files=8,
                    max_file_bytes=2 * 1024 * 1024, max_total_bytes=8 * 1024 * 1024)
    conf.ensure_dirs()
    APP.dependency_overrides[get_settings] = lambda: conf
    yield APP
    APP.dependency_overrides.clear()
    from app.db import dispose_engines

    dispose_engines()


def test_the_schema_covers_every_route():
    assert len(OPERATIONS) >= 12, sorted(OPERATIONS)


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_5xx_with_and_without_a_key(fuzz_app, label):
    from hypothesis import given
    from hypothesis import strategies as st

    op = OPERATIONS[label]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for mode in modes])

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        authed = case.call(headers={"Authorization": f"Bearer {KEY}"})
        SEEN.setdefault(label, []).append(authed.status_code)
        assert authed.status_code < 500, (f"{case.method} {case.formatted_path}: {authed.status_code} "
                                          f"{authed.text[:500]}\n{case.as_curl_command()}")
        anonymous = case.call(headers={"Authorization": ""})
        assert anonymous.status_code < 500, f"{case.method} {case.formatted_path}: {anonymous.status_code}"
        if case.path not in OPEN:
            assert anonymous.status_code == 401, f"{case.method} {case.formatted_path} let an anonymous caller in"
            assert anonymous.json()["error"]["type"] == "authentication_error"

    check()


def test_submissions_with_a_real_model_and_fuzzed_uploads(fuzz_app, clips):
    """The schema-driven cases never name a model that exists, so they stop at the model check; here the
    model is real and the rest (settings, file names, file bytes, transcripts) is fuzzed, which drives
    the upload validation: every answer is 202 or a clear 4xx, never 5xx."""
    from fastapi.testclient import TestClient
    from hypothesis import given
    from hypothesis import strategies as st

    real = clips[0].read_bytes()
    names = st.one_of(st.text(min_size=0, max_size=40), st.sampled_from(
        ["a.flac", "../../etc/passwd.flac", "/abs.wav", "x\x00.wav", "..", ".", "dir/clip.flac", "ñ.ogg", "a" * 300]))
    payloads = st.one_of(st.binary(max_size=2048), st.sampled_from([b"", real, real[: len(real) // 3], real[:64]]),
                         st.binary(min_size=1, max_size=64).map(lambda b: real[:4096] + b))
    files = st.lists(st.tuples(names, payloads), max_size=3)
    form = st.fixed_dictionaries({}, optional={
        "method": st.one_of(st.sampled_from(["rtn", "tarq", "gptq"]), st.text(max_size=8)),
        "bits": st.one_of(st.integers(-3, 20).map(str), st.text(max_size=4)),
        "group_size": st.one_of(st.sampled_from(["-1", "0", "32", "128", "129", "99999999999999999999"]),
                                st.text(max_size=4)),
        "sym": st.sampled_from(["true", "false", "yes", "2", ""]),
        "num_samples": st.one_of(st.integers(-5, 200000).map(str), st.text(max_size=4)),
    })
    transcripts = st.one_of(st.none(), st.binary(max_size=256), st.text(max_size=200).map(str.encode))

    with TestClient(fuzz_app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"

        @given(files=files, form=form, transcripts=transcripts, archive=st.one_of(st.none(), payloads))
        @settings(max_examples=EXAMPLES * 3, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(files, form, transcripts, archive):
            parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
            if transcripts is not None:
                parts.append(("transcripts", ("t.tsv", transcripts, "text/plain")))
            if archive is not None:
                parts.append(("archive", ("a.zip", archive, "application/zip")))
            response = client.post("/v1/quantizations", data={"model": "tiny-whisper", **form}, files=parts or None)
            SEEN.setdefault("POST /v1/quantizations (real model)", []).append(response.status_code)
            assert response.status_code < 500, f"{response.status_code} {response.text[:500]} form={form}"
            assert response.status_code in (200, 202, 413, 415, 422), response.text

        check()
