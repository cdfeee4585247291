"""/v1/models: the models this server quantized or was sent (OpenAI's list shape plus their metadata),
uploads, and every model's files for download: each a Hugging Face folder that tarq, or transformers with
compressed-tensors, loads."""
from __future__ import annotations

import json
import shutil
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError

from app import downloads, jobs
from app.deps import EngineDep, KeyDep, SettingsDep, StorageDep
from app.schemas import ERROR_RESPONSES, ApiError, Deleted, ModelFileList, ModelList, ModelPublic
from app.uploads import ARCHIVE_SUFFIXES, Budget, stage_model

FLOAT_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.get("", response_model=ModelList)
def list_models(engine: EngineDep, _: KeyDep):
    return {"object": "list", "data": [jobs.public_model(m) for m in jobs.list_models(engine)]}


@router.post("", status_code=201, response_model=ModelPublic)
def upload_model(
    settings: SettingsDep,
    engine: EngineDep,
    storage: StorageDep,
    owner: KeyDep,
    name: Annotated[str | None, Form(max_length=200, description="what to call it (default: the archive's "
                                                                     "name); the id is made from it")] = None,
    files: Annotated[list[UploadFile] | None, File(description="the model folder's files")] = None,
    archive: Annotated[UploadFile | None, File(description="the model folder as zip, tar or tar.gz")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    """Upload a Whisper model folder (say, a fine-tuned one) as it is: safetensors weights, config,
    processor and tokenizer files. 201 with its id, which a quantization or a transcription then names
    as its `model`; 200 with the model an earlier upload with the same `Idempotency-Key` made (a client
    retrying after a lost answer gets one model, not two)."""
    if idempotency_key and (earlier := jobs.find_upload_by_idempotency_key(engine, owner, idempotency_key)):
        return JSONResponse(jobs.public_model(earlier), status_code=200)
    label = ((name or "").strip() or _archive_stem(archive) or "model")[:200]
    model_id = jobs.new_upload_id(label)
    staging = settings.data_dir / "staging" / model_id
    try:
        kept = stage_model(staging, Budget.for_model(settings), files=files or [], archive=archive, shown=label)
        record = _describe(staging, label, kept, "archive" if archive is not None and not files else "files")
        storage.put_dir(staging, f"artifacts/{model_id}", move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        model = jobs.add_model(engine, id=model_id, job_id=None, owner=owner, idempotency_key=idempotency_key or None,
                               size_bytes=storage.size(f"artifacts/{model_id}"), **record)
    except Exception as err:
        storage.delete(f"artifacts/{model_id}")
        # a concurrent upload with the same key won the insert
        if (idempotency_key and isinstance(err, IntegrityError)
                and (earlier := jobs.find_upload_by_idempotency_key(engine, owner, idempotency_key))):
            return JSONResponse(jobs.public_model(earlier), status_code=200)
        raise
    return JSONResponse(jobs.public_model(model), status_code=201)


def _describe(folder, label: str, kept: list[str], param: str) -> dict:
    """The model record of an uploaded folder: a float model to quantize (method `none`), or a quantized
    artifact (tarq's, or compressed-tensors pack-quantized) that is served as it is, never quantized again."""
    from tarq.artifact_info import artifact_info, is_artifact
    from tarq.errors import ModelError

    config = json.loads((folder / "config.json").read_text())
    if not is_artifact(folder):
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        return {"base_model": label, "method": jobs.UPLOADED, "bits": FLOAT_BITS.get(dtype, 32), "group_size": 0,
                "info": {"uploaded": True, "dtype": dtype, "files": kept}}
    try:
        info = artifact_info(folder)
        if not all(isinstance(info[k], int) for k in ("bits", "group_size")):
            raise ModelError("its quantization_config's weights lack num_bits or group_size")
    except ModelError as err:
        raise ApiError(422, f"model {label!r} is not a quantized model tarq can load: "
                            f"{str(err).replace(f'{folder}/', '')}", param=param, code="bad_quantized_model") from None
    info.pop("path", None)
    return {"base_model": info["base_model"] or label, "method": str(info["method"] or "unknown")[:16],
            "bits": int(info["bits"]), "group_size": int(info["group_size"]),
            "info": {**info, "uploaded": True, "files": kept}}


def _archive_stem(archive: UploadFile | None) -> str:
    name = (archive.filename or "") if archive is not None else ""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, engine: EngineDep, _: KeyDep):
    return jobs.public_model(jobs.get_model(engine, model_id))


@router.delete("/{model_id}", response_model=Deleted)
def delete_model(model_id: str, engine: EngineDep, storage: StorageDep, _: KeyDep):
    jobs.get_model(engine, model_id)  # 404 first
    using = jobs.active_jobs_from(engine, model_id)
    if using:
        raise ApiError(409, f"model {model_id!r} is being quantized or evaluated by job {using[0]}"
                            f"{f' and {len(using) - 1} more' if len(using) > 1 else ''}; cancel or wait for it first",
                       code="model_in_use")
    storage.delete(f"artifacts/{model_id}")
    jobs.delete_model(engine, model_id)
    return {"id": model_id, "object": "model", "deleted": True}


@router.get("/{model_id}/files", response_model=ModelFileList)
def list_model_files(model_id: str, engine: EngineDep, storage: StorageDep, _: KeyDep):
    jobs.get_model(engine, model_id)
    files = storage.files(f"artifacts/{model_id}")
    return {"object": "list", "data": [{"path": path, "size_bytes": size} for path, size in files.items()]}


@router.get("/{model_id}/files/{path:path}", response_class=StreamingResponse, responses={
    200: {"content": {"application/octet-stream": {}}, "description": "the file"},
    206: {"content": {"application/octet-stream": {}}, "description": "the bytes a Range header asked for"},
    416: {"description": "the range starts past the end of the file"}})
def download_model_file(model_id: str, path: str, engine: EngineDep, storage: StorageDep, _: KeyDep,
                        range_: Annotated[str | None, Header(alias="Range")] = None):
    jobs.get_model(engine, model_id)
    key = f"artifacts/{model_id}"
    size = storage.files(key).get(path)
    if size is None:  # only listed files are served: no path reaches storage unchecked
        raise ApiError(404, f"model {model_id!r} has no file {path!r}", param="path", code="not_found")
    wanted = downloads.byte_range(range_, size)
    first, last = wanted or (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(last - first + 1),
               "Content-Disposition": downloads.attachment(path.rsplit("/", 1)[-1])}
    if wanted:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(downloads.read(storage, f"{key}/{path}", first, last - first + 1),
                             status_code=206 if wanted else 200, media_type="application/octet-stream",
                             headers=headers)


@router.get("/{model_id}/archive", response_class=StreamingResponse, responses={
    200: {"content": {"application/x-tar": {}}, "description": "the model's folder as one tar"}})
def download_model_archive(model_id: str, engine: EngineDep, storage: StorageDep, _: KeyDep):
    model = jobs.get_model(engine, model_id)
    key = f"artifacts/{model_id}"
    length, members = downloads.tar_layout(model_id, storage.files(key), int(model["created_at"].timestamp()))
    return StreamingResponse(downloads.tar_stream(storage, key, members), media_type="application/x-tar",
                             headers={"Content-Length": str(length),
                                      "Content-Disposition": downloads.attachment(f"{model_id}.tar")})
