"""The HTTP API against real SQLite and real PostgreSQL (no worker: jobs stay queued here)."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from tests.service.conftest import make_zip, upload

NON_HEALTH_ROUTES = [
    ("POST", "/v1/quantizations"),
    ("GET", "/v1/quantizations"),
    ("GET", "/v1/quantizations/abc"),
    ("DELETE", "/v1/quantizations/abc"),
    ("GET", "/v1/quantizations/abc/events"),
    ("POST", "/v1/evaluations"),
    ("GET", "/v1/evaluations"),
    ("GET", "/v1/evaluations/abc"),
    ("DELETE", "/v1/evaluations/abc"),
    ("GET", "/v1/evaluations/abc/events"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/abc"),
    ("DELETE", "/v1/models/abc"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/abc/files"),
    ("GET", "/v1/models/abc/files/config.json"),
    ("GET", "/v1/models/abc/archive"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("GET", "/metrics"),
]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type"} <= set(body["error"]), body
    return body["error"]


def submit(client, clips, **form):
    data = {"model": "tiny-whisper", "method": "rtn", **form}
    return client.post("/v1/quantizations", data=data, files=upload(clips))


# health and auth -----------------------------------------------------------------------------------------
def test_health_routes_are_open(make_client, settings):
    client = make_client(settings, key=None)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("method,path", NON_HEALTH_ROUTES)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_every_other_route_needs_a_valid_key(make_client, settings, method, path, key):
    client = make_client(settings, key=key)
    err = error_of(client.request(method, path), 401)
    assert ("missing API key" if key is None else "invalid API key") in err["message"]


def test_a_transcribe_key_only_transcribes_and_reads_the_model_list(make_client, make_settings, database_url,
                                                                   clips):
    """TARQ_API_KEYS entries `<key>@transcribe` (plain or sha256:) reach the audio routes and the model
    records; everything else is 403 naming the role. The full key next to them is unaffected."""
    import hashlib

    hashed = hashlib.sha256(b"app-key-2").hexdigest()
    settings = make_settings(database_url=database_url, api_keys=f"admin-key,app-key-1@transcribe,sha256:{hashed}@transcribe")
    admin = make_client(settings, key="admin-key")
    assert admin.post("/v1/models", files={"archive": ("m.txt", b"x", "text/plain")}).status_code == 415
    for key in ("app-key-1", "app-key-2"):
        app = make_client(settings, key=key)
        assert app.get("/v1/models").status_code == 200
        assert app.get("/v1/models/nope").status_code == 404
        for route in ("transcriptions", "translations"):  # past the key check: the missing file is the problem
            assert error_of(app.post(f"/v1/audio/{route}", data={"model": "tiny-whisper"}), 422)["param"] == "file"
        for method, path in [("POST", "/v1/quantizations"), ("GET", "/v1/quantizations"), ("POST", "/v1/evaluations"),
                             ("DELETE", "/v1/models/m"), ("POST", "/v1/models"), ("GET", "/v1/models/m/files"),
                             ("GET", "/v1/models/m/archive"), ("GET", "/metrics")]:
            err = error_of(app.request(method, path), 403)
            assert err["type"] == "permission_error" and "'transcribe'" in err["message"], (method, path)
    assert submit(admin, clips[:1]).status_code == 202


@pytest.mark.parametrize("keys,words", [("a@admin", "role 'admin' is not one of all, transcribe"),
                                        ("a@", "role '' is not one of"), ("@transcribe", "neither part empty")])
def test_a_key_with_an_unknown_role_stops_the_settings(make_settings, keys, words):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=words):
        make_settings(api_keys=keys)


def test_a_server_without_keys_refuses_everything(make_client, make_settings, tmp_path):
    client = make_client(make_settings(api_keys="", database_url=f"sqlite:///{tmp_path}/x.sqlite"))
    err = error_of(client.get("/v1/models"), 401)
    assert "TARQ_API_KEYS" in err["message"]


def test_hashed_keys_and_generated_key_file(make_client, make_settings, tmp_path):
    from app.auth import ensure_api_key
    from app.settings import hash_key

    hashed = make_settings(api_keys=f"sha256:{hash_key('s3cret')}", database_url=f"sqlite:///{tmp_path}/a.sqlite")
    assert make_client(hashed, key="s3cret").get("/v1/models").status_code == 200
    assert make_client(hashed, key="sha256:" + hash_key("s3cret")).get("/v1/models").status_code == 401

    fresh = make_settings(api_keys="", data_dir=tmp_path / "fresh", database_url=f"sqlite:///{tmp_path}/b.sqlite")
    path = ensure_api_key(fresh)
    assert path == fresh.api_key_file and (path.stat().st_mode & 0o777) == 0o600
    key = path.read_text().strip()
    assert ensure_api_key(fresh) == path and path.read_text().strip() == key  # stable across restarts
    assert make_client(fresh, key=key).get("/v1/models").status_code == 200


def test_every_response_names_its_request(make_client, settings):
    """X-Request-ID on every answer, refusals included: the client's own when plain and short, else a new one."""
    import re

    client = make_client(settings)
    made = [client.get("/v1/models").headers["x-request-id"] for _ in range(3)]
    assert len(set(made)) == 3 and all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in made), made
    assert client.get("/v1/models", headers={"X-Request-ID": "trace-42.a:b"}).headers["x-request-id"] == "trace-42.a:b"
    for odd in ("a b", "x" * 129, "<script>"):
        assert client.get("/v1/models", headers={"X-Request-ID": odd}).headers["x-request-id"].startswith("req_")
    assert make_client(settings, key=None).get("/v1/models").headers["x-request-id"].startswith("req_")  # 401
    assert client.get("/v1/models/nope").headers["x-request-id"].startswith("req_")  # 404


def test_metrics(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "tarq_jobs" in response.text and "tarq_http_requests_total" in response.text


# submitting and reading jobs -----------------------------------------------------------------------------
def test_submit_read_list_cancel(client, clips, clip_transcripts, settings):
    response = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "bits": "4"},
                           files=upload(clips) + [("transcripts", ("t.tsv", clip_transcripts, "text/plain"))])
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["model"] is None and job["error"] is None
    assert job["progress"] == {"stage": None, "layer": None, "layers_total": None, "fraction": 0.0, "loss": None}
    assert job["config"]["method"] == "rtn" and job["config"]["group_size"] == 128
    assert job["config"]["forward_dtype"] == "float32"  # the default
    assert job["files"]["calibration"]["clips"] == sorted(c.name for c in clips)
    assert job["files"]["calibration"]["transcripts"] is True
    assert len(job["id"]) == 32
    assert job["source_model"].endswith("tiny-whisper")
    stored = settings.data_dir / "storage" / "uploads" / job["id"] / "calibration"
    assert sorted(p.name for p in stored.iterdir()) == sorted([c.name for c in clips] + ["transcripts.tsv"])

    assert client.get(f"/v1/quantizations/{job['id']}").json()["id"] == job["id"]
    listed = client.get("/v1/quantizations").json()
    assert listed["object"] == "list" and [j["id"] for j in listed["data"]] == [job["id"]]

    cancelled = client.delete(f"/v1/quantizations/{job['id']}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert not stored.exists()  # uploads of a finished job are removed
    err = error_of(client.delete(f"/v1/quantizations/{job['id']}"), 409)
    assert "cancelled" in err["message"]


def test_pagination(client, clips):
    ids = [submit(client, clips[:1]).json()["id"] for _ in range(3)]
    page1 = client.get("/v1/quantizations", params={"limit": 2}).json()
    assert page1["has_more"] is True and [j["id"] for j in page1["data"]] == ids[::-1][:2]
    page2 = client.get("/v1/quantizations", params={"limit": 2, "after": page1["last_id"]}).json()
    assert page2["has_more"] is False and [j["id"] for j in page2["data"]] == [ids[0]]
    queued = client.get("/v1/quantizations", params={"status": "queued"}).json()
    assert len(queued["data"]) == 3
    error_of(client.get("/v1/quantizations", params={"status": "bogus"}), 422)


def test_idempotency_key_returns_the_same_job(client, clips):
    first = client.post(
        "/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"}, files=upload(clips[:1]),
        headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202
    again = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                        files=upload(clips[:1]), headers={"Idempotency-Key": "abc-1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                        files=upload(clips[:1]), headers={"Idempotency-Key": "abc-2"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert len(client.get("/v1/quantizations").json()["data"]) == 2


def test_cancel_running_job_sets_the_flag(client, clips, engine):
    from app import jobs

    job_id = submit(client, clips[:1]).json()["id"]
    assert jobs.claim(engine, job_id, "w1", stale_after=60)["status"] == "running"
    response = client.delete(f"/v1/quantizations/{job_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    assert jobs.heartbeat(engine, job_id, "w1") is True  # the worker sees the request
    jobs.transition(engine, job_id, jobs.CANCELLED, error="cancelled by request")
    error_of(client.delete(f"/v1/quantizations/{job_id}"), 409)


def test_events_stream_ends_with_the_final_state(client, clips):
    job_id = submit(client, clips[:1]).json()["id"]
    client.delete(f"/v1/quantizations/{job_id}")
    with client.stream("GET", f"/v1/quantizations/{job_id}/events") as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    assert "event: end" in text
    data = [ln[len("data: "):] for ln in text.splitlines() if ln.startswith("data: ")]
    assert json.loads(data[-1])["status"] == "cancelled"


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/quantizations/{}"), ("DELETE", "/v1/quantizations/{}"), ("GET", "/v1/quantizations/{}/events"),
    ("GET", "/v1/models/{}"), ("DELETE", "/v1/models/{}"),
])
def test_unknown_ids_are_404(client, method, path):
    err = error_of(client.request(method, path.format("0123456789abcdef")), 404)
    assert "0123456789abcdef" in err["message"]


# bad input -----------------------------------------------------------------------------------------------
def test_empty_file(client):
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=[("files", ("empty.wav", b"", "audio/wav"))]), 422)
    assert "'empty.wav' is empty" in err["message"]


def test_random_bytes_named_wav(client):
    import numpy as np

    noise = np.random.default_rng(0).bytes(4096)
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=[("files", ("noise.wav", noise, "audio/wav"))]), 422)
    assert "noise.wav" in err["message"] and "not decodable audio" in err["message"]


def test_text_file_is_not_audio(client):
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=[("files", ("notes.txt", b"hello world\n" * 50, "text/plain"))]), 415)
    assert "notes.txt" in err["message"] and "not audio" in err["message"]


def test_truncated_flac(client, clips):
    data = clips[0].read_bytes()
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=[("files", ("cut.flac", data[: len(data) // 3], "audio/flac"))]), 422)
    assert "cut.flac" in err["message"]


@pytest.mark.parametrize("name", ["../evil.flac", "/etc/evil.flac", "a/../../evil.flac"])
def test_archive_with_unsafe_paths(client, clips, name):
    archive = make_zip({"ok.flac": clips[0].read_bytes(), name: clips[1].read_bytes()})
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=[("archive", ("calib.zip", archive, "application/zip"))]), 422)
    assert "unsafe path" in err["message"] and name in err["message"]


def test_tar_with_traversal_and_links(client, clips):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("link.flac")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=[("archive", ("calib.tar.gz", buf.getvalue(), "application/gzip"))]), 422)
    assert "link" in err["message"]


def test_zip_bomb_is_refused(client):
    bomb = make_zip({"bomb.wav": b"\0" * (64 << 20)})  # 64 MiB of zeros deflate to ~64 KiB
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=[("archive", ("bomb.zip", bomb, "application/zip"))]), 413)
    assert "bomb.wav" in err["message"]


def test_good_tar_gz_archive(client, clips, clip_transcripts):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for clip in clips:
            tf.add(clip, arcname=f"calib/{clip.name}")
        info = tarfile.TarInfo("calib/transcripts.tsv")
        info.size = len(clip_transcripts)
        tf.addfile(info, io.BytesIO(clip_transcripts))
        info = tarfile.TarInfo("calib/README.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    response = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "tarq"},
                           files=[("archive", ("calib.tar.gz", buf.getvalue(), "application/gzip"))])
    assert response.status_code == 202, response.text
    assert response.json()["files"]["calibration"]["clips"] == sorted(c.name for c in clips)
    assert response.json()["files"]["calibration"]["transcripts"] is True


def test_oversize_file_is_413(make_client, make_settings, database_url, clips):
    client = make_client(make_settings(database_url=database_url, max_file_bytes=10_000))
    err = error_of(submit(client, clips[:1]), 413)
    assert clips[0].name in err["message"] and "TARQ_MAX_FILE_BYTES" in err["message"]


def test_oversize_body_is_413_before_reading(make_client, make_settings, database_url):
    client = make_client(make_settings(database_url=database_url, max_total_bytes=1000, max_file_bytes=1000))
    blob = b"\0" * (3 << 20)
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper"},
                               files=[("files", ("big.wav", blob, "audio/wav"))]), 413)
    assert "over the limit" in err["message"]


def test_oversize_total_is_413(make_client, make_settings, database_url, clips):
    sizes = [c.stat().st_size for c in clips[:2]]
    client = make_client(make_settings(database_url=database_url, max_total_bytes=sum(sizes) - 1))
    err = error_of(submit(client, clips[:2]), 413)
    assert "TARQ_MAX_TOTAL_BYTES" in err["message"] and clips[1].name in err["message"]


def test_too_many_files_is_413(make_client, make_settings, database_url, clips):
    client = make_client(make_settings(database_url=database_url, max_files=2))
    err = error_of(submit(client, clips[:3]), 413)
    assert "too many files" in err["message"]


def test_too_long_audio_is_413(make_client, make_settings, database_url, clips):
    client = make_client(make_settings(database_url=database_url, max_audio_seconds=1.0))
    err = error_of(submit(client, clips[:1]), 413)
    assert "TARQ_MAX_AUDIO_SECONDS" in err["message"] and clips[0].name in err["message"]


def test_model_outside_roots(client, clips, tmp_path):
    for model in ("../../etc", "/etc", str(tmp_path)):
        err = error_of(submit(client, clips[:1], model=model), 422)
        assert "outside the allowed model roots" in err["message"], model


def test_folder_that_is_not_a_model(client, clips, model_root, tmp_path):
    name = f"not-a-model-{tmp_path.name}"
    folder = model_root / name
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    err = error_of(submit(client, clips[:1], model=str(folder)), 422)
    assert "no config.json" in err["message"]
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "not a Whisper model" in error_of(submit(client, clips[:1], model=name), 422)["message"]
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    assert "pickle" in error_of(submit(client, clips[:1], model=name), 422)["message"]
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper", "auto_map": {"AutoModel": "x.Y"}}))
    assert "remote code" in error_of(submit(client, clips[:1], model=name), 422)["message"]


def test_hub_id_not_cached_while_offline(client, clips):
    err = error_of(submit(client, clips[:1], model="nobody/no-such-whisper"), 422)
    assert "nobody/no-such-whisper" in err["message"] and "offline" in err["message"]


def test_bad_settings_and_missing_fields(client, clips):
    assert "method" in error_of(submit(client, clips[:1], method="awq"), 422)["message"]
    assert "bits" in error_of(submit(client, clips[:1], bits="5"), 422)["message"]
    err = error_of(submit(client, clips[:1], forward_dtype="int8"), 422)
    assert "forward_dtype" in err["message"] and "int8" in err["message"]
    accepted = submit(client, clips[:1], forward_dtype="bfloat16")
    assert accepted.status_code == 202 and accepted.json()["config"]["forward_dtype"] == "bfloat16"
    err = error_of(submit(client, clips[:1], sequential="group"), 422)
    assert "sequential" in err["message"] and "group" in err["message"]
    accepted = submit(client, clips[:1], sequential="layer")
    assert accepted.status_code == 202 and accepted.json()["config"]["sequential"] == "layer"
    # TARQ's and GPTQ's own knobs reach the job's config; out of range, each is named
    knobs = {"zipf_threshold": 4.0, "lambda_cost": 2.0, "lambda_positions": "text", "digits_are_tail": False, "rarebal": False, "residual": False,
             "residual_step": "full", "encoder_tagging": "frames", "act_order": True, "damp": 0.05, "seed": 7}
    accepted = submit(client, clips[:1], method="tarq", **{k: str(v).lower() for k, v in knobs.items()})
    assert accepted.status_code == 202, accepted.text
    assert {k: accepted.json()["config"][k] for k in knobs} == knobs
    for field, bad in (("zipf_threshold", "9"), ("zipf_threshold", "nan"), ("lambda_cost", "0"),
                       ("lambda_cost", "inf"), ("lambda_cost", "nan"), ("lambda_positions", "prompt"),
                       ("residual_step", "half"),
                       ("encoder_tagging", "words"), ("damp", "1.5")):
        err = error_of(submit(client, clips[:1], **{field: bad}), 422)
        assert field in err["message"] and bad in err["message"], err
    assert error_of(submit(client, clips[:1], rarebal="maybe"), 422)["param"] == "rarebal"
    err = error_of(client.post("/v1/quantizations", data={"method": "rtn"}, files=upload(clips[:1])), 422)
    assert err["param"] == "model" and "required" in err["message"].lower()
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "gptq"}), 422)
    assert "calibration audio" in err["message"]


def test_transcripts_naming_missing_clips(client, clips, clip_transcripts):
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=upload(clips[:1]) + [("transcripts", ("t.tsv", clip_transcripts, "text/plain"))]),
                   422)
    assert clips[1].name in err["message"] and "not among the uploaded clips" in err["message"]


def test_bad_transcripts(client, clips):
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               files=upload(clips[:1]) + [("transcripts", ("t.tsv", b"no tab here\n", "text/plain"))]),
                   422)
    assert "transcripts" in err["message"]


def test_nothing_is_stored_after_a_refusal(client, clips, settings):
    assert submit(client, clips[:1], model="/etc").status_code == 422
    noise = [("files", ("noise.wav", b"RIFF" + b"\x01" * 5000, "audio/wav"))]
    assert client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                       files=upload(clips[:1]) + noise).status_code == 422
    uploads = settings.data_dir / "storage" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())
    staging = settings.data_dir / "staging"
    assert not staging.exists() or not any(staging.iterdir())


# models and transcription (no worker needed for these refusals) -------------------------------------------
def test_models_list_get_delete(client, engine, settings):
    from app import jobs

    assert client.get("/v1/models").json() == {"object": "list", "data": []}
    jobs.add_model(engine, id="m-1", job_id=None, owner="x", base_model="openai/whisper-tiny", method="rtn", bits=4,
                   group_size=128, size_bytes=10, info={"metrics": {"wer": 1.0}})
    folder = settings.data_dir / "storage" / "artifacts" / "m-1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["m-1"] and listed[0]["object"] == "model"
    one = client.get("/v1/models/m-1").json()
    assert one["base_model"] == "openai/whisper-tiny" and one["metrics"] == {"wer": 1.0}
    assert client.delete("/v1/models/m-1").json() == {"id": "m-1", "object": "model", "deleted": True}
    assert not folder.exists()
    error_of(client.get("/v1/models/m-1"), 404)


@pytest.mark.parametrize("route", ["transcriptions", "translations"])
def test_transcription_refusals(client, clips, route):
    def post(name="a.flac", data=None, **form):
        data = clips[0].read_bytes() if data is None else data
        return client.post(f"/v1/audio/{route}", data={"model": "tiny-whisper", **form},
                           files={"file": (name, data, "audio/flac")})

    assert "no-such-model" in error_of(post(model="no-such-model"), 404)["message"]
    assert "response format" in error_of(post(response_format="xml"), 422)["message"]
    if route == "transcriptions":  # translations take no language: OpenAI's leave it out too
        assert "language" in error_of(post(language="xx"), 422)["message"]
    assert "not audio" in error_of(post(name="a.txt", data=b"text " * 100), 415)["message"]
    assert "is empty" in error_of(post(data=b""), 422)["message"]
    assert error_of(client.post(f"/v1/audio/{route}", data={"model": "tiny-whisper"}), 422)["param"] == "file"


# dependencies down ---------------------------------------------------------------------------------------
def test_database_down_gives_503_and_stores_nothing(make_client, make_settings, clips):
    settings = make_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    client = make_client(settings)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
    assert ready.json()["checks"]["storage"] == "ok"
    err = error_of(submit(client, clips[:1]), 503)
    assert "database" in err["message"]
    uploads = settings.data_dir / "storage" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_storage_down_gives_503_and_records_nothing(make_client, make_settings, clips, tmp_path):
    """S3 unreachable (nothing listens on its port): submissions and downloads answer 503 naming the store,
    no job is recorded; the details (the store's URL, the error) go to the log only."""
    from app import jobs
    from app.db import get_engine
    from tests.service.conftest import free_port

    settings = make_settings(storage_url="s3://tarq-down/prefix", s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
                             s3_access_key_id="k", s3_secret_access_key="s", s3_region="us-east-1",
                             database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    client = make_client(settings)
    engine = get_engine(settings.database)
    assert client.get("/readyz").json()["checks"]["storage"].startswith("error")
    err = error_of(submit(client, clips[:1]), 503)
    assert err["code"] == "storage_unavailable" and "artifact store" in err["message"]
    assert "tarq-down" not in err["message"] and client.get("/v1/quantizations").json()["data"] == []
    jobs.add_model(engine, id="m-1", job_id=None, owner="x", base_model="b", method="rtn", bits=4, group_size=128,
                   size_bytes=1, info={})
    assert error_of(client.get("/v1/models/m-1/files/config.json"), 503)["code"] == "storage_unavailable"


def test_broker_down_gives_503_and_a_failed_job(make_client, make_settings, clips, tmp_path):
    from app import jobs
    from app.db import get_engine

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'b.sqlite'}", broker_url="redis://127.0.0.1:1/0")
    client = make_client(settings)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
    err = error_of(submit(client, clips[:1]), 503)
    assert "broker" in err["message"]
    [job] = jobs.list_jobs(get_engine(settings.database))
    assert job["status"] == "failed" and "could not queue" in job["error"]


def _wav(seconds: float, rate: int, channels: int) -> bytes:
    """A 440 Hz tone as 16-bit PCM WAV, written with the standard library."""
    import io
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    frames = np.repeat(tone[:, None], channels, axis=1).tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


def test_zero_second_audio_is_refused(client):
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "gptq"},
                               files=[("files", ("silence.wav", _wav(0, 16000, 1), "audio/wav"))]), 422)
    assert "silence.wav" in err["message"]


@pytest.mark.parametrize("rate,channels", [(8000, 1), (44100, 2), (48000, 6)])
def test_other_sample_rates_and_multichannel_are_accepted(client, rate, channels):
    """Any rate and channel layout is valid speech: tarq downmixes and resamples to 16 kHz mono."""
    r = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "gptq"},
                    files=[("files", (f"tone-{rate}-{channels}.wav", _wav(1.5, rate, channels), "audio/wav"))])
    assert r.status_code == 202, r.text


def test_transcription_dtype_setting_is_checked(monkeypatch, tmp_path):
    from pydantic import ValidationError

    from app.settings import Settings

    monkeypatch.setenv("TARQ_DTYPE", "int8")
    with pytest.raises(ValidationError, match="dtype"):
        Settings(data_dir=tmp_path)
    monkeypatch.setenv("TARQ_DTYPE", "auto")
    assert Settings(data_dir=tmp_path).dtype == "auto"
    monkeypatch.delenv("TARQ_DTYPE")
    assert Settings(data_dir=tmp_path).dtype == "auto"
    monkeypatch.setenv("TARQ_CPU_BF16", "yes")
    with pytest.raises(ValidationError, match="cpu_bf16"):
        Settings(data_dir=tmp_path)
    monkeypatch.setenv("TARQ_CPU_BF16", "0")
    assert Settings(data_dir=tmp_path).cpu_bf16 == "0"
    monkeypatch.setenv("TARQ_NO_SPEECH_THRESHOLD", "1.5")  # a probability
    with pytest.raises(ValidationError, match="no_speech_threshold"):
        Settings(data_dir=tmp_path)
    monkeypatch.setenv("TARQ_NO_SPEECH_THRESHOLD", "1")
    assert Settings(data_dir=tmp_path).no_speech_threshold == 1.0
    monkeypatch.setenv("TARQ_TEMPERATURE_INCREMENT_ON_FALLBACK", "-0.2")
    with pytest.raises(ValidationError, match="temperature_increment_on_fallback"):
        Settings(data_dir=tmp_path)
    monkeypatch.setenv("TARQ_TEMPERATURE_INCREMENT_ON_FALLBACK", "0")
    monkeypatch.setenv("TARQ_COMPRESSION_RATIO_THRESHOLD", "0")
    with pytest.raises(ValidationError, match="compression_ratio_threshold"):
        Settings(data_dir=tmp_path)
    monkeypatch.delenv("TARQ_COMPRESSION_RATIO_THRESHOLD")
    monkeypatch.delenv("TARQ_TEMPERATURE_INCREMENT_ON_FALLBACK")
    assert (Settings(data_dir=tmp_path).temperature_increment_on_fallback,
            Settings(data_dir=tmp_path).compression_ratio_threshold) == (0.0, 2.4)  # off; openai's threshold


def test_server_timing_names_the_workers_steps_and_the_rest():
    from app.routes.transcriptions import server_timing

    assert server_timing({"model": 0.5, "audio": 0.01, "transcribe": 2.0}, 3.0) == \
        "model;dur=500.0, audio;dur=10.0, transcribe;dur=2000.0, queue;dur=490.0"
    # a worker of an older version reports fewer steps; the queue is never negative
    assert server_timing({"transcribe": 2.0, "model": "?"}, 1.5) == "transcribe;dur=2000.0, queue;dur=0.0"
