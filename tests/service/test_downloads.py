"""Downloading a quantized model: its file list, one file with byte ranges (resume), the folder as a tar;
on a local folder and on S3 (a real moto server on loopback)."""
from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest

from tests.service.test_api import error_of

FILES = {
    "model.safetensors": os.urandom((5 << 20) // 2 + 7),  # 2.5 MiB: crosses the 1 MiB read chunks
    "config.json": b'{"model_type": "whisper"}',
    "empty.txt": b"",
    "tokenizer/vocab.json": b'{"a": 1}' * 100,
}
SIZE = len(FILES["model.safetensors"])


@pytest.fixture(params=["local", "s3"])
def stored(request, make_settings, make_client, tmp_path):
    """A client, and the id of a model whose artifact folder holds FILES in the parametrized storage."""
    from app import jobs
    from app.db import get_engine
    from app.deps import storage_dep

    overrides = {}
    if request.param == "s3":
        endpoint, bucket = request.getfixturevalue("s3_server")
        overrides = dict(storage_url=f"s3://{bucket}/tarq", s3_endpoint_url=endpoint, s3_access_key_id="testing",
                         s3_secret_access_key="testing", s3_region="us-east-1")
    settings = make_settings(**overrides)
    client = make_client(settings)
    storage = storage_dep(settings)
    for path, data in FILES.items():
        storage.put_bytes(f"artifacts/m-1/{path}", data)
    jobs.add_model(get_engine(settings.database), id="m-1", job_id=None, owner="x", base_model="tiny", method="rtn",
                   bits=4, group_size=128, size_bytes=sum(map(len, FILES.values())), info={})
    return client, "m-1"


def test_files_are_listed_with_their_sizes(stored):
    client, model = stored
    listed = client.get(f"/v1/models/{model}/files").json()
    assert listed["object"] == "list"
    assert {f["path"]: f["size_bytes"] for f in listed["data"]} == {p: len(d) for p, d in FILES.items()}


def test_each_file_downloads_whole(stored):
    client, model = stored
    for path, data in FILES.items():
        got = client.get(f"/v1/models/{model}/files/{path}")
        assert got.status_code == 200 and got.content == data, path
        assert got.headers["content-length"] == str(len(data)) and got.headers["accept-ranges"] == "bytes"
        assert got.headers["content-disposition"] == f'attachment; filename="{path.split("/")[-1]}"'


@pytest.mark.parametrize("header,first,last", [
    ("bytes=0-9", 0, 9),
    ("bytes=1048570-1048580", 1048570, 1048580),  # across a chunk boundary
    (f"bytes=100-{SIZE + 1000}", 100, SIZE - 1),  # an end past the file is clamped
    ("bytes=2097152-", 2097152, SIZE - 1),
    ("bytes=-5", SIZE - 5, SIZE - 1),
    (f"bytes=-{SIZE * 2}", 0, SIZE - 1),
])
def test_a_range_sends_those_bytes(stored, header, first, last):
    client, model = stored
    got = client.get(f"/v1/models/{model}/files/model.safetensors", headers={"Range": header})
    assert got.status_code == 206, got.text
    assert got.content == FILES["model.safetensors"][first:last + 1]
    assert got.headers["content-range"] == f"bytes {first}-{last}/{SIZE}"
    assert got.headers["content-length"] == str(last - first + 1)


def test_an_interrupted_download_resumes_where_it_stopped(stored):
    client, model = stored
    url = f"/v1/models/{model}/files/model.safetensors"
    with client.stream("GET", url) as response:  # the connection drops after the first chunk
        part = next(response.iter_bytes())
    rest = client.get(url, headers={"Range": f"bytes={len(part)}-"})
    assert 0 < len(part) < SIZE and rest.status_code == 206
    assert part + rest.content == FILES["model.safetensors"]


@pytest.mark.parametrize("header", ["bytes=5-2", "items=0-10", "bytes=0-1,4-5", "bytes=-", "bytes=x-1"])
def test_a_range_this_does_not_serve_is_ignored(stored, header):
    client, model = stored
    got = client.get(f"/v1/models/{model}/files/config.json", headers={"Range": header})
    assert got.status_code == 200 and got.content == FILES["config.json"]


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0"])
def test_a_range_past_the_end_is_416_with_the_size(stored, header):
    client, model = stored
    got = client.get(f"/v1/models/{model}/files/model.safetensors", headers={"Range": header})
    err = error_of(got, 416)
    assert got.headers["content-range"] == f"bytes */{SIZE}" and str(SIZE) in err["message"]


def test_the_archive_holds_the_folder(stored, tmp_path):
    client, model = stored
    got = client.get(f"/v1/models/{model}/archive")
    assert got.status_code == 200 and got.headers["content-type"] == "application/x-tar"
    assert got.headers["content-length"] == str(len(got.content))
    assert got.headers["content-disposition"] == f'attachment; filename="{model}.tar"'
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members == {f"{model}/{path}": data for path, data in FILES.items()}
    (tmp_path / "m.tar").write_bytes(got.content)  # and GNU tar reads it as well
    subprocess.run(["tar", "-xf", "m.tar"], cwd=tmp_path, check=True)
    assert (tmp_path / model / "model.safetensors").read_bytes() == FILES["model.safetensors"]


@pytest.mark.parametrize("path", ["nope.bin", "tokenizer", "..%2F..%2Fapi_key", "%2E%2E/%2E%2E/api_key",
                                  "tokenizer/..%2Fconfig.json"])
def test_a_file_the_model_does_not_have_is_404(stored, path):
    client, model = stored
    err = error_of(client.get(f"/v1/models/{model}/files/{path}"), 404)
    assert model in err["message"]


@pytest.mark.parametrize("route", ["files", "files/config.json", "archive"])
def test_unknown_and_deleted_models_are_404(stored, route):
    client, model = stored
    assert "no-such" in error_of(client.get(f"/v1/models/no-such/{route}"), 404)["message"]
    assert client.delete(f"/v1/models/{model}").status_code == 200
    error_of(client.get(f"/v1/models/{model}/{route}"), 404)

