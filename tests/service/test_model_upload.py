"""POST /v1/models: a Whisper folder uploaded as it is (repeated files or one archive), checked before
anything is stored, then named by quantizations; refusals name the problem and store nothing."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from tests.service.conftest import make_zip
from tests.service.test_api import error_of, submit


def folder_files(folder, **replace) -> dict[str, bytes]:
    """The folder's files by name; `replace` swaps contents (None drops a file)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    for name, data in replace.items():
        name = name.replace("__", ".")
        if data is None:
            files.pop(name, None)
        else:
            files[name] = data
    return files


def as_fields(files: dict[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in files.items()]


def make_tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def stored_nothing(client, settings) -> bool:
    artifacts = settings.data_dir / "storage" / "artifacts"
    staging = settings.data_dir / "staging"
    return (client.get("/v1/models").json()["data"] == []
            and (not artifacts.exists() or not any(artifacts.iterdir()))
            and (not staging.exists() or not any(staging.iterdir())))


def test_a_folder_uploaded_as_files_becomes_a_model(client, tiny_whisper_dir):
    extra = {"pytorch_model.bin": b"\x80\x04pickle", "notes.txt": b"hello"}  # left out: pickle and stray
    sent = folder_files(tiny_whisper_dir) | extra
    response = client.post("/v1/models", files=as_fields(sent), data={"name": "acme/whisper-medical"})
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["id"].startswith("whisper-medical-") and model["base_model"] == "acme/whisper-medical"
    assert model["method"] == "none" and model["group_size"] == 0 and model["bits"] in (16, 32)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [model["id"]]
    listed = {f["path"]: f["size_bytes"] for f in client.get(f"/v1/models/{model['id']}/files").json()["data"]}
    assert listed == {name: len(data) for name, data in sent.items() if name not in extra}
    assert model["size_bytes"] == sum(listed.values())
    got = client.get(f"/v1/models/{model['id']}/files/model.safetensors")
    assert got.content == sent["model.safetensors"]


def test_an_upload_repeated_with_its_idempotency_key_makes_one_model(client, settings, tiny_whisper_dir):
    """A client that lost the answer sends the upload again with the same key: 200 with the first model,
    nothing stored twice. Another key is another model; so is the same key after the model is deleted."""
    fields = as_fields(folder_files(tiny_whisper_dir))
    first = client.post("/v1/models", files=fields, headers={"Idempotency-Key": "up-1"})
    assert first.status_code == 201, first.text
    again = client.post("/v1/models", files=fields, headers={"Idempotency-Key": "up-1"})
    assert again.status_code == 200 and again.json() == first.json()
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [first.json()["id"]]
    assert len(list((settings.data_dir / "storage" / "artifacts").iterdir())) == 1
    other = client.post("/v1/models", files=fields, headers={"Idempotency-Key": "up-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert client.delete(f"/v1/models/{first.json()['id']}").status_code == 200
    anew = client.post("/v1/models", files=fields, headers={"Idempotency-Key": "up-1"})
    assert anew.status_code == 201 and anew.json()["id"] not in (first.json()["id"], other.json()["id"])
    assert error_of(client.post("/v1/models", files=fields, headers={"Idempotency-Key": "k" * 201}),
                    422)["param"] == "idempotency-key"


def test_two_uploads_at_once_with_one_idempotency_key_make_one_model(client, settings, tiny_whisper_dir):
    """Both pass the first look (nothing made with the key yet) while they are checked; the second insert
    meets the unique key, drops its stored copy and answers with the first one's model."""
    import concurrent.futures

    fields = as_fields(folder_files(tiny_whisper_dir))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/models", files=fields, headers={"Idempotency-Key": "race"}),
                                range(2)))
    assert sorted(a.status_code for a in answers) == [200, 201], [a.text for a in answers]
    assert answers[0].json()["id"] == answers[1].json()["id"]
    assert len(client.get("/v1/models").json()["data"]) == 1
    assert len(list((settings.data_dir / "storage" / "artifacts").iterdir())) == 1


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_folder_uploaded_as_an_archive_becomes_a_model(client, tiny_whisper_dir, kind):
    members = {f"my-whisper/{name}": data for name, data in folder_files(tiny_whisper_dir).items()}
    blob = make_tar_gz(members) if kind == "tar.gz" else make_zip(members)
    response = client.post("/v1/models", files={"archive": (f"my-whisper.{kind}", blob, "application/octet-stream")})
    assert response.status_code == 201, response.text
    assert response.json()["base_model"] == "my-whisper" and response.json()["id"].startswith("my-whisper-")
    names = {f["path"] for f in client.get(f"/v1/models/{response.json()['id']}/files").json()["data"]}
    assert names == set(folder_files(tiny_whisper_dir))


def _config(folder, **changes) -> bytes:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    return json.dumps(config).encode()


@pytest.mark.parametrize("case,status,code,words", [
    ("nothing", 422, "no_files", "no model files"),
    ("not whisper", 422, "not_whisper", "not a Whisper model"),
    ("remote code", 422, "remote_code", "remote code"),
    ("pickle only", 422, "pickle_weights", "pickle weights"),
    ("no processor", 422, "incomplete_model", "preprocessor_config.json"),
    ("truncated weights", 422, "bad_weights", "model.safetensors is not a valid safetensors file"),
    ("no config", 422, "not_a_model", "no config.json"),
])
def test_a_bad_folder_is_refused_and_nothing_is_stored(client, settings, tiny_whisper_dir, case, status, code, words):
    weights = (tiny_whisper_dir / "model.safetensors").read_bytes()
    files = {
        "nothing": {},
        "not whisper": folder_files(tiny_whisper_dir, config__json=_config(tiny_whisper_dir, model_type="bert")),
        "remote code": folder_files(tiny_whisper_dir, config__json=_config(tiny_whisper_dir,
                                                                          auto_map={"AutoModel": "x.Y"})),
        "pickle only": folder_files(tiny_whisper_dir, model__safetensors=None, pytorch_model__bin=b"\x80\x04"),
        "no processor": folder_files(tiny_whisper_dir, preprocessor_config__json=None),
        "truncated weights": folder_files(tiny_whisper_dir, model__safetensors=weights[:-100]),
        "no config": folder_files(tiny_whisper_dir, config__json=None),
    }[case]
    err = error_of(client.post("/v1/models", files=as_fields(files) or None, data={"name": "x"}), status)
    assert err["code"] == code and words in err["message"], err
    assert stored_nothing(client, settings)


def test_unsafe_and_non_archives_are_refused(client, settings, tiny_whisper_dir):
    blob = make_tar_gz({"../config.json": b"{}"})
    err = error_of(client.post("/v1/models", files={"archive": ("m.tar.gz", blob, "application/gzip")}), 422)
    assert err["code"] == "unsafe_archive_path" and err["param"] == "archive"
    err = error_of(client.post("/v1/models", files={"archive": ("m.txt", b"plain text", "text/plain")}), 415)
    assert err["code"] == "bad_archive"
    assert stored_nothing(client, settings)


def test_a_model_over_the_model_limit_is_413(make_client, make_settings, tiny_whisper_dir):
    settings = make_settings(max_model_bytes=10_000)
    client = make_client(settings)
    err = error_of(client.post("/v1/models", files=as_fields(folder_files(tiny_whisper_dir))), 413)
    assert "TARQ_MAX_MODEL_BYTES" in err["message"]
    assert stored_nothing(client, settings)
    # the audio limits do not apply to a model: the same folder passes a small TARQ_MAX_FILE_BYTES
    client = make_client(make_settings(max_file_bytes=10_000, max_total_bytes=10_000, data_dir=settings.data_dir))
    assert client.post("/v1/models", files=as_fields(folder_files(tiny_whisper_dir))).status_code == 201


def test_an_archive_counts_once_against_the_model_limit(make_client, make_settings, tiny_whisper_dir):
    """The limit bounds the model: a tar a little under it passes (its bytes are not counted twice, as the
    archive and as what comes out of it), one over it is 413."""
    members = {f"m/{name}": data for name, data in folder_files(tiny_whisper_dir).items()}
    blob = make_tar_gz(members)
    size = sum(map(len, members.values()))
    for limit, status in ((int(size * 1.1), 201), (size - 1, 413)):
        client = make_client(make_settings(max_model_bytes=limit))
        got = client.post("/v1/models", files={"archive": ("m.tar.gz", blob, "application/gzip")})
        assert got.status_code == status, (limit, got.text)


def test_quantizing_an_uploaded_model_and_deleting_it_while_it_is_used(client, clips, tiny_whisper_dir):
    model = client.post("/v1/models", files=as_fields(folder_files(tiny_whisper_dir))).json()["id"]
    job = submit(client, clips[:1], model=model, method="gptq")
    assert job.status_code == 202, job.text
    assert job.json()["source_model"] == model
    err = error_of(client.delete(f"/v1/models/{model}"), 409)
    assert err["code"] == "model_in_use" and job.json()["id"] in err["message"]
    assert client.delete(f"/v1/quantizations/{job.json()['id']}").status_code == 202  # cancel the queued job
    assert client.delete(f"/v1/models/{model}").status_code == 200


def test_a_quantized_model_is_not_quantized_again(client, engine, clips):
    from app import jobs

    jobs.add_model(engine, id="q-1", job_id=None, owner="x", base_model="openai/whisper-tiny", method="gptq",
                   bits=4, group_size=128, size_bytes=1, info={})
    err = error_of(submit(client, clips[:1], model="q-1", method="rtn"), 422)
    assert err["code"] == "already_quantized" and "openai/whisper-tiny" in err["message"]


@pytest.fixture(scope="module")
def rtn_artifact(tiny_whisper_dir, tmp_path_factory):
    """tiny-whisper quantized with RTN by the library, as a user would with `tarq quantize` elsewhere."""
    from tarq.config import QuantConfig
    from tarq.pipeline import quantize_model

    return quantize_model(tiny_whisper_dir, None, tmp_path_factory.mktemp("rtn") / "art", QuantConfig(method="rtn"))


def test_a_quantized_folder_is_served_as_it_is_and_not_quantized_again(client, clips, rtn_artifact, tiny_whisper_dir):
    response = client.post("/v1/models", files=as_fields(folder_files(rtn_artifact)), data={"name": "tiny-rtn"})
    assert response.status_code == 201, response.text
    model = response.json()
    assert (model["method"], model["bits"], model["group_size"]) == ("rtn", 4, 128)
    assert model["base_model"] == str(tiny_whisper_dir)  # what the artifact says it was made from
    assert {f["path"] for f in client.get(f"/v1/models/{model['id']}/files").json()["data"]} >= {
        "README.md", "tarq_report.json", "model.safetensors"}
    err = error_of(submit(client, clips[:1], model=model["id"]), 422)
    assert err["code"] == "already_quantized"


def test_a_quantized_folder_tarq_cannot_load_is_refused(client, settings, rtn_artifact):
    config = json.loads((rtn_artifact / "config.json").read_text())
    config["quantization_config"]["format"] = "float-quantized"
    files = folder_files(rtn_artifact, config__json=json.dumps(config).encode())
    err = error_of(client.post("/v1/models", files=as_fields(files)), 422)
    assert err["code"] == "bad_quantized_model" and "float-quantized" in err["message"]
    assert str(settings.data_dir) not in err["message"]  # no server path in the message
    assert stored_nothing(client, settings)
