"""/v1/evaluations against real SQLite and PostgreSQL: submissions are checked and queued like
quantizations (no worker here), kept apart from them, and a worker's evaluation step scores real speech
with the tiny model in this process."""
from __future__ import annotations

import pytest

from app import jobs
from tests.service.conftest import upload
from tests.service.test_api import error_of, submit


def transcripts_of(clips, clip_transcripts: bytes, stems: bool = False) -> bytes:
    """clip_transcripts restricted to `clips`, keyed by stem if asked."""
    names = {c.name: c.stem for c in clips}
    lines = [ln.split("\t", 1) for ln in clip_transcripts.decode().splitlines() if "\t" in ln]
    return "".join(f"{names[f] if stems else f}\t{t}\n" for f, t in lines if f in names).encode()


def stored_uploads(settings, job_id: str) -> list[str]:
    folder = settings.data_dir / "storage" / "uploads" / job_id / "eval"
    return [p.name for p in folder.iterdir()] if folder.is_dir() else []


def evaluate(client, clips, transcripts: bytes | None, model: str = "tiny-whisper", **headers):
    files = upload(clips)
    if transcripts is not None:
        files.append(("transcripts", ("transcripts.tsv", transcripts, "text/tab-separated-values")))
    return client.post("/v1/evaluations", data={"model": model}, files=files, headers=headers)


def test_an_evaluation_is_queued_and_kept_apart_from_quantizations(client, clips, clip_transcripts, settings):
    made = evaluate(client, clips[:2], transcripts_of(clips[:2], clip_transcripts))
    assert made.status_code == 202, made.text
    ev = made.json()
    assert ev["object"] == "evaluation" and ev["status"] == "queued" and ev["result"] is None
    assert ev["model"].endswith("tiny-whisper") and ev["config"]["model"] == {"source": ev["model"]}
    assert ev["files"]["eval"]["clips"] == sorted(c.name for c in clips[:2]) and ev["files"]["eval"]["transcripts"]
    assert client.get(f"/v1/evaluations/{ev['id']}").json() == ev
    assert [e["id"] for e in client.get("/v1/evaluations").json()["data"]] == [ev["id"]]
    quantization = submit(client, clips[:1]).json()
    assert [q["id"] for q in client.get("/v1/quantizations").json()["data"]] == [quantization["id"]]
    assert "no quantization job" in error_of(client.get(f"/v1/quantizations/{ev['id']}"), 404)["message"]
    assert "no evaluation job" in error_of(client.get(f"/v1/evaluations/{quantization['id']}"), 404)["message"]
    assert error_of(client.delete(f"/v1/evaluations/{quantization['id']}"), 404)
    assert [e["id"] for e in client.get("/v1/evaluations", params={"model": ev["model"]}).json()["data"]] == [ev["id"]]
    assert client.get("/v1/evaluations", params={"model": "another"}).json()["data"] == []
    assert [q["id"] for q in client.get("/v1/quantizations", params={"source_model": quantization["source_model"]}
                                        ).json()["data"]] == [quantization["id"]]
    assert sorted(stored_uploads(settings, ev["id"])) == sorted([c.name for c in clips[:2]] + ["transcripts.tsv"])


def test_bad_evaluations_are_refused_and_nothing_is_stored(client, clips, clip_transcripts, settings):
    refs = transcripts_of(clips[:2], clip_transcripts)
    assert error_of(evaluate(client, clips[:2], None), 422)["param"] == "transcripts"
    err = error_of(evaluate(client, clips[:1], refs), 422)  # a reference for a clip not sent
    assert err["param"] == "transcripts" and clips[1].name in err["message"]
    assert error_of(evaluate(client, clips[:2], refs, model="nope/nothing-here"), 404)["code"] == "model_not_found"
    assert error_of(client.post("/v1/evaluations", data={"model": "tiny-whisper", "zipf_threshold": "0"},
                                files=upload(clips[:1])), 422)
    assert client.get("/v1/evaluations").json()["data"] == []
    uploads = settings.data_dir / "storage" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_transcripts_keyed_by_stem_are_stored_by_file_name(client, clips, clip_transcripts, settings):
    """The worker looks a clip's reference up by its file name: a tsv naming clips by stem is rewritten,
    for evaluations and for quantizations' calibration alike."""
    by_stem = transcripts_of(clips[:2], clip_transcripts, stems=True)
    ev = evaluate(client, clips[:2], by_stem).json()
    stored = (settings.data_dir / "storage" / "uploads" / ev["id"] / "eval" / "transcripts.tsv").read_text()
    assert stored == transcripts_of(clips[:2], clip_transcripts).decode()
    files = upload(clips[:2]) + [("transcripts", ("t.tsv", by_stem, "text/tab-separated-values"))]
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "gptq"}, files=files).json()
    calib = settings.data_dir / "storage" / "uploads" / job["id"] / "calibration" / "transcripts.tsv"
    assert calib.read_text() == stored


def test_idempotency_keys_of_evaluations(client, clips, clip_transcripts):
    refs = transcripts_of(clips[:1], clip_transcripts)
    first = evaluate(client, clips[:1], refs, **{"Idempotency-Key": "ev-1"})
    again = evaluate(client, clips[:1], refs, **{"Idempotency-Key": "ev-1"})
    assert first.status_code == 202 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert submit(client, clips[:1], method="rtn").status_code == 202
    q = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                    headers={"Idempotency-Key": "q-1"}).json()
    err = error_of(evaluate(client, clips[:1], refs, **{"Idempotency-Key": "q-1"}), 409)
    assert err["code"] == "idempotency_key_reused" and q["id"] in err["message"]
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                               headers={"Idempotency-Key": "ev-1"}), 409)
    assert first.json()["id"] in err["message"]


def test_cancelling_a_queued_evaluation_drops_its_uploads(client, clips, clip_transcripts, settings):
    ev = evaluate(client, clips[:1], transcripts_of(clips[:1], clip_transcripts)).json()
    cancelled = client.delete(f"/v1/evaluations/{ev['id']}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert not (settings.data_dir / "storage" / "uploads" / ev["id"]).exists()
    assert error_of(client.delete(f"/v1/evaluations/{ev['id']}"), 409)


def test_the_worker_scores_an_evaluation_and_stops_when_cancelled(client, engine, settings, clips, clip_transcripts,
                                                                  tmp_path, monkeypatch):
    """worker.tasks._evaluate, the step the job task runs for an evaluation, on the stored uploads: every
    clip gets a hypothesis and the scores come with their counts; a cancel request stops it between
    batches."""
    from app.storage import storage_from_settings
    from tarq.errors import Cancelled
    from worker import tasks

    monkeypatch.setattr(tasks, "_storage", storage_from_settings(settings))
    ev = evaluate(client, clips[:3], transcripts_of(clips[:3], clip_transcripts)).json()
    job = jobs.claim(engine, ev["id"], "w", 60)
    seen = []
    status, fields = tasks._evaluate(engine, job, tmp_path / "scratch", seen.append, lambda: False, {})
    result = fields["result"]
    assert status == jobs.SUCCEEDED and set(result["hypotheses"]) == {c.name for c in clips[:3]}
    assert result["utterances"] == 3 and result["words"] > 0 and result["model"] == ev["model"]
    assert isinstance(result["wer"], float) and result["dtype"] in ("float32", "bfloat16")
    assert "data" not in result and result["kernels"] == {}  # a float model: no int4 layers
    assert [p.stage for p in seen] == ["load", "evaluate"]
    assert (seen[-1].layer, seen[-1].layers_total) == (3, 3)
    with pytest.raises(Cancelled):
        tasks._evaluate(engine, job, tmp_path / "scratch2", seen.append, lambda: True, {})


def test_metrics_count_jobs_by_kind_and_status(client, clips, clip_transcripts):
    evaluate(client, clips[:1], transcripts_of(clips[:1], clip_transcripts))
    submit(client, clips[:1])
    cancelled = submit(client, clips[:1]).json()["id"]
    client.delete(f"/v1/quantizations/{cancelled}")
    text = client.get("/metrics").text
    for kind, status, n in (("evaluate", "queued", 1), ("quantize", "queued", 1), ("quantize", "cancelled", 1),
                            ("evaluate", "succeeded", 0)):
        assert f'tarq_jobs{{kind="{kind}",status="{status}"}} {n:.1f}' in text, (kind, status)
    assert 'tarq_jobs_submitted_total{kind="evaluate"}' in text
