"""Uploads and artifacts over fsspec: a local folder by default, s3:// when configured, so that the API
and workers on different hosts see the same files.

Keys are relative posix paths: `uploads/<job id>/calibration/<clip>`, `uploads/<job id>/eval/<clip>`,
`artifacts/<model id>/...`, `tmp/<request id>/<clip>`. Ids are random, so a key is never guessable,
and nothing here is served without going through an authenticated route.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import fsspec


class StorageUnavailable(OSError):
    """The store could not be reached or refused an operation (a missing key is FileNotFoundError)."""


def _store_errors() -> tuple[type[BaseException], ...]:
    try:  # s3fs turns most S3 answers into OSErrors, but not a connection that fails
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def guarded(method):
    """Re-raise the store's failures as StorageUnavailable naming the store, so that the API can answer
    503 instead of 500; FileNotFoundError and the key checks' ValueError pass unchanged."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (StorageUnavailable, FileNotFoundError):
            raise
        except _store_errors() as err:
            raise StorageUnavailable(f"storage {self.url} is unavailable: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else ''}") from err
    return run


class Storage:
    def __init__(self, url: str, options: dict | None = None, cache_dir: Path | None = None):
        self.url = url.rstrip("/")
        self.protocol, root = fsspec.core.split_protocol(self.url)
        self.protocol = self.protocol or "file"
        self.fs = fsspec.filesystem(self.protocol, **(options or {}))
        self.root = root if self.protocol != "file" else str(Path(root).expanduser().resolve())
        self.local = self.protocol in ("file", "local")
        self.cache_dir = cache_dir  # where remote folders are copied for a worker to load

    def path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"unsafe storage key {key!r}")
        return f"{self.root}/{key}"

    @guarded
    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    @guarded
    def put_file(self, local: Path, key: str, move: bool = False) -> None:
        """Store a local file; with `move` the caller gives it up, and a local store takes it by a rename
        where it can (staging and store on one disk: no second copy of a model's gigabytes)."""
        path = self.path(key)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if move:
                shutil.move(local, path)
            else:
                shutil.copyfile(local, path)
        else:
            self.fs.put_file(str(local), path)

    @guarded
    def put_dir(self, local: Path, key: str, move: bool = False) -> None:
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                self.put_file(file, f"{key}/{file.relative_to(local).as_posix()}", move=move)

    @guarded
    def get_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    @guarded
    def get_dir(self, key: str, local: Path) -> Path:
        """Copy a stored folder to a local one (the worker's scratch space)."""
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        prefix = self.path(key)
        for path in self.fs.find(prefix):
            target = local / self._relative(path, prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(target))
        return local

    @guarded
    def files(self, key: str) -> dict[str, int]:
        """The files of a stored folder: path relative to it (posix) -> size in bytes; {} if absent."""
        prefix = self.path(key)
        found = self.fs.find(prefix, detail=True)
        return {self._relative(path, prefix): int(info["size"]) for path, info in sorted(found.items())
                if info.get("type") == "file"}

    @guarded
    def open(self, key: str):
        """A binary file object for reading (seekable, on S3 too)."""
        return self.fs.open(self.path(key), "rb")

    def _relative(self, path: str, prefix: str) -> str:
        if self.local:
            return Path(os.path.relpath(path, prefix)).as_posix()
        return path[len(prefix.rstrip("/")) + 1:]

    @guarded
    def local_dir(self, key: str) -> Path:
        """A local folder with the content of `key`: the folder itself when storage is local, else a
        copy in cache_dir (made once; an artifact never changes after it is written). Each new copy
        first drops the copies of folders deleted from the store since (a model deleted through another
        API host), so that a worker's disk holds no more than the models that still exist."""
        if self.local:
            return Path(self.path(key))
        if self.cache_dir is None:
            raise RuntimeError("remote storage needs a cache_dir to load artifacts from")
        target = self.cache_dir / key
        if not (target / ".complete").exists():
            self.forget_deleted(key.rsplit("/", 1)[0])
            partial = target.with_name(target.name + f".partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            self.get_dir(key, partial)
            (partial / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        return target

    @guarded
    def forget_deleted(self, parent: str) -> list[str]:
        """Remove the cached copies under `parent` whose folder is gone from the store; returns their keys.
        Copies still being made (no `.complete` yet) are left alone."""
        folder = self.cache_dir / parent if self.cache_dir is not None else None
        if folder is None or not folder.is_dir():
            return []
        self.fs.invalidate_cache()  # s3fs remembers listings: a deletion by another host is not in them
        gone = [f"{parent}/{copy.name}" for copy in sorted(folder.iterdir())
                if (copy / ".complete").exists() and not self.exists(f"{parent}/{copy.name}")]
        for key in gone:
            shutil.rmtree(self.cache_dir / key, ignore_errors=True)
        return gone

    @guarded
    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    @guarded
    def size(self, key: str) -> int:
        path = self.path(key)
        return int(self.fs.du(path)) if self.fs.exists(path) else 0

    @guarded
    def delete(self, key: str) -> None:
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir / key, ignore_errors=True)

    @guarded
    def check(self) -> None:
        """Raise if the store cannot be written and read back (readiness)."""
        key = "tmp/.readyz"
        self.put_bytes(key, b"ok")
        if self.get_bytes(key) != b"ok":
            raise OSError(f"storage {self.url} did not return what was written")


def storage_from_settings(settings) -> Storage:
    return Storage(settings.storage, settings.storage_options, cache_dir=settings.data_dir / "cache")
