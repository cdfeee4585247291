"""/v1/models: quantized models made by this server (OpenAI's list shape plus their metadata)."""
from __future__ import annotations

from fastapi import APIRouter

from app import jobs
from app.deps import EngineDep, KeyDep, StorageDep
from app.schemas import ERROR_RESPONSES, Deleted, ModelList, ModelPublic

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.get("", response_model=ModelList)
def list_models(engine: EngineDep, _: KeyDep):
    return {"object": "list", "data": [jobs.public_model(m) for m in jobs.list_models(engine)]}


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, engine: EngineDep, _: KeyDep):
    return jobs.public_model(jobs.get_model(engine, model_id))


@router.delete("/{model_id}", response_model=Deleted)
def delete_model(model_id: str, engine: EngineDep, storage: StorageDep, _: KeyDep):
    jobs.get_model(engine, model_id)  # 404 first
    storage.delete(f"artifacts/{model_id}")
    jobs.delete_model(engine, model_id)
    return {"id": model_id, "object": "model", "deleted": True}
