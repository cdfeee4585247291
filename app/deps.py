"""FastAPI dependencies: settings, database engine, storage, Celery sender, the caller's key.

Everything derives from get_settings(), which tests override through app.dependency_overrides. The
Celery app here only sends tasks by name: the API never imports worker code.
"""
from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy import Engine

from app.auth import check_key
from app.db import get_engine
from app.settings import Settings, get_settings
from app.storage import Storage, storage_from_settings

_lock = threading.Lock()
_storages: dict[tuple, Storage] = {}
_celery: dict[tuple, object] = {}

SettingsDep = Annotated[Settings, Depends(get_settings)]


def engine_dep(settings: SettingsDep) -> Engine:
    return get_engine(settings.database)


def storage_dep(settings: SettingsDep) -> Storage:
    key = (settings.storage, repr(settings.storage_options), str(settings.data_dir))
    with _lock:
        if key not in _storages:
            _storages[key] = storage_from_settings(settings)
        return _storages[key]


def celery_client(settings: Settings):
    """A Celery app configured like the worker's, used to send tasks and read results."""
    from celery import Celery

    config = settings.celery_config()
    key = (config["broker_url"], config["result_backend"], str(settings.data_dir))
    with _lock:
        if key not in _celery:
            settings.ensure_dirs()
            client = Celery("tarq-api", set_as_current=False)
            client.conf.update(config)
            _celery[key] = client
        return _celery[key]


def celery_dep(settings: SettingsDep):
    return celery_client(settings)


def api_key_dep(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The sha256 of the caller's key (its identity for idempotency keys and ownership)."""
    return check_key(authorization, settings)


EngineDep = Annotated[Engine, Depends(engine_dep)]
StorageDep = Annotated[Storage, Depends(storage_dep)]
CeleryDep = Annotated[object, Depends(celery_dep)]
KeyDep = Annotated[str, Depends(api_key_dep)]
