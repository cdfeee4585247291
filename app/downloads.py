"""Stored folders sent back to clients: one file with HTTP byte ranges (so that an interrupted download of
a large `model.safetensors` resumes with `curl -C -`), or a whole folder as one uncompressed tar stream.

Both read through app.storage in chunks, so a local folder and S3 serve alike and nothing is held in
memory whole. The tar is built here, not with tarfile's writer, because its length must be known
before the first byte (Content-Length) and its members streamed from storage; tarfile still writes
each member's header.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from urllib.parse import quote

from app.schemas import ApiError
from app.storage import Storage

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte a `Range` header asks for, or None to send the whole file.

    One range only: a header this does not parse, or one with several ranges, is ignored, as RFC 9110
    allows. A range that starts past the end is refused with 416 and the file's size.
    """
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    if match.group(1) == "":  # bytes=-N: the last N bytes; N = 0 asks for nothing, which no file holds
        suffix = int(match.group(2))
        first, last = (max(size - suffix, 0), size - 1) if suffix else (size, size)
    else:
        first = int(match.group(1))
        last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        if match.group(2) and int(match.group(2)) < first:
            return None  # syntactically invalid: ignored
    if first >= size:
        raise ApiError(416, f"range {header!r} starts past the end of the file ({size} bytes)",
                       code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return first, last


def read(storage: Storage, key: str, first: int, length: int) -> Iterator[bytes]:
    with storage.open(key) as f:
        f.seek(first)
        while length > 0:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                raise OSError(f"{key} ended {length} bytes early")
            length -= len(chunk)
            yield chunk


def attachment(name: str) -> str:
    return f"attachment; filename=\"{quote(name)}\""


def tar_layout(top: str, files: dict[str, int], mtime: int) -> tuple[int, list[tuple[bytes, str, int]]]:
    """(total bytes, [(header, relative path, size)]) of a tar holding `files` under the folder `top`."""
    members, total = [], 0
    for path, size in files.items():
        info = tarfile.TarInfo(f"{top}/{path}")
        info.size, info.mtime, info.mode = size, mtime, 0o644
        header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
        members.append((header, path, size))
        total += len(header) + size + _padding(size)
    return total + 2 * BLOCK, members


def tar_stream(storage: Storage, key: str, members: list[tuple[bytes, str, int]]) -> Iterator[bytes]:
    for header, path, size in members:
        yield header
        yield from read(storage, f"{key}/{path}", 0, size)
        if _padding(size):
            yield b"\0" * _padding(size)
    yield b"\0" * (2 * BLOCK)  # end of archive


def _padding(size: int) -> int:
    return -size % BLOCK
