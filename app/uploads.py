"""Checking uploaded calibration/evaluation audio before anything is queued.

Everything a client sends is staged in a private local folder, checked, and only then copied to
storage: names are reduced to a safe basename, sizes are counted while reading (headers are not
trusted), archives are read member by member (never extracted by the library, so no path in them
can escape), and every clip must decode. A refusal is an ApiError naming the file and the limit.
"""
from __future__ import annotations

import os
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from app.schemas import ApiError
from app.settings import Settings

CHUNK = 1 << 20
TRANSCRIPTS = "transcripts.tsv"
_SAFE = re.compile(r"[^\w.\- ]")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
ARCHIVE_SUFFIXES = (".zip", *TAR_SUFFIXES)  # the names an archive upload may have


def audio_extensions() -> frozenset[str]:
    from tarq.audio import AUDIO_EXTENSIONS

    return frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in AUDIO_EXTENSIONS)


@dataclass
class Budget:
    """Counts files and bytes across one request; 413 as soon as a limit is passed. Audio uploads have
    a per-file and a total limit; a model upload one limit for both (`for_model`)."""

    settings: Settings
    files: int = 0
    total: int = 0
    max_file_bytes: int | None = None
    max_total_bytes: int | None = None
    file_limit_name: str = "TARQ_MAX_FILE_BYTES"
    total_limit_name: str = "TARQ_MAX_TOTAL_BYTES"

    def __post_init__(self):
        self.max_file_bytes = self.max_file_bytes or self.settings.max_file_bytes
        self.max_total_bytes = self.max_total_bytes or self.settings.max_total_bytes

    @classmethod
    def for_model(cls, settings: Settings) -> "Budget":
        limit = settings.max_model_bytes
        return cls(settings, max_file_bytes=limit, max_total_bytes=limit, file_limit_name="TARQ_MAX_MODEL_BYTES",
                   total_limit_name="TARQ_MAX_MODEL_BYTES")

    def add_file(self, name: str) -> None:
        self.files += 1
        if self.files > self.settings.max_files:
            raise ApiError(413, f"too many files: more than {self.settings.max_files} (TARQ_MAX_FILES); "
                                f"{name!r} is one too many", code="too_many_files")

    def add_bytes(self, name: str, file_bytes: int, n: int) -> None:
        self.total += n
        if file_bytes > self.max_file_bytes:
            raise ApiError(413, f"file {name!r} is larger than {self.max_file_bytes} bytes "
                                f"({self.file_limit_name})", code="file_too_large")
        if self.total > self.max_total_bytes:
            raise ApiError(413, f"upload is larger than {self.max_total_bytes} bytes in total "
                                f"({self.total_limit_name}), reached while reading {name!r}", code="upload_too_large")


@dataclass
class Staged:
    """A checked folder of clips (+ transcripts.tsv when given), ready to copy to storage."""

    folder: Path
    clips: list[str] = field(default_factory=list)
    seconds: float = 0.0
    transcripts: bool = False

    def summary(self) -> dict:
        return {"clips": sorted(self.clips), "seconds": round(self.seconds, 3), "transcripts": self.transcripts}


def safe_name(raw: str | None, field_name: str) -> str:
    """The basename of a client-given file name, restricted to harmless characters."""
    name = PurePosixPath((raw or "").replace("\\", "/")).name
    if not name or name in (".", "..") or name.startswith("."):
        raise ApiError(422, f"field {field_name!r}: file name {raw!r} is not usable", param=field_name)
    return _SAFE.sub("_", name)[:200]


def copy_limited(src: BinaryIO, dest: Path, name: str, budget: Budget, limit: int | None = None) -> int:
    """Copy a stream to dest, counting bytes; 413 past the limits. Returns the size."""
    size = 0
    with open(dest, "wb") as out:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            budget.add_bytes(name, size, len(chunk))
            if limit is not None and size > limit:
                raise ApiError(413, f"archive member {name!r} expands more than {limit} bytes, beyond "
                                    f"{budget.settings.max_archive_ratio:.0f}x its compressed size "
                                    "(TARQ_MAX_ARCHIVE_RATIO); refusing a possible zip bomb", code="archive_ratio")
            out.write(chunk)
    return size


def check_audio(path: Path, name: str, settings: Settings, param: str) -> float:
    """Decode a clip fully; returns its duration. 422 empty/corrupt, 415 not audio, 413 too long."""
    from tarq.audio import load_audio, probe_audio
    from tarq.errors import TarqError

    if path.stat().st_size == 0:
        raise ApiError(422, f"file {name!r} is empty", param=param, code="empty_file")
    is_audio_name = path.suffix.lower() in audio_extensions()
    try:
        info = probe_audio(path, name=name)
        duration = float(info.duration)
        if duration > settings.max_audio_seconds:
            raise ApiError(413, f"file {name!r} is {duration:.1f} s long; the limit is "
                                f"{settings.max_audio_seconds:g} s (TARQ_MAX_AUDIO_SECONDS)",
                           param=param, code="audio_too_long")
        samples = load_audio(path, name=name, max_seconds=settings.max_audio_seconds)
    except TarqError as err:
        message = str(err) if name in str(err) else f"{name}: {err}"
        if is_audio_name:
            raise ApiError(422, f"file {name!r} is not decodable audio: {message}", param=param,
                           code="corrupt_audio") from None
        raise ApiError(415, f"file {name!r} is not audio: {message}", param=param, code="not_audio") from None
    if len(samples) == 0 or duration <= 0:
        raise ApiError(422, f"file {name!r} holds no audio (0 seconds)", param=param, code="empty_audio")
    return duration


def _archive_kind(name: str, head: bytes, param: str) -> str:
    lower = name.lower()
    if lower.endswith(".zip") or head.startswith(b"PK\x03\x04"):
        return "zip"
    if lower.endswith(TAR_SUFFIXES) or head.startswith(b"\x1f\x8b"):
        return "tar"
    raise ApiError(415, f"archive {name!r} is neither a zip nor a tar.gz", param=param, code="bad_archive")


def _member_name(raw: str, archive: str, param: str) -> str | None:
    """Validate a member path; None for entries to skip (folders, macOS/hidden files)."""
    path = raw.replace("\\", "/")
    parts = PurePosixPath(path).parts
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or ".." in parts:
        raise ApiError(422, f"archive {archive!r} holds an unsafe path {raw!r} (absolute or with '..')",
                       param=param, code="unsafe_archive_path")
    if not parts or path.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return _SAFE.sub("_", parts[-1])[:200]


def extract_archive(src: BinaryIO, name: str, dest: Path, budget: Budget, param: str = "archive") -> list[str]:
    """Read a zip/tar(.gz) (a seekable file, read from its start) member by member into dest (flat). The
    archive is held to the per-file limit; the total counts what comes out of it (counted both ways, a 6 GB
    model in a 6 GB tar would need a 12 GB limit). Returns the names written."""
    settings = budget.settings
    size = src.seek(0, os.SEEK_END)
    budget.add_bytes(name, size, 0)
    src.seek(0)
    kind = _archive_kind(name, src.read(4), param)
    src.seek(0)
    written: list[str] = []
    ratio_total = max(size, 1) * settings.max_archive_ratio

    def take(member_name: str, stream: BinaryIO, limit: int) -> None:
        if member_name in written:
            raise ApiError(422, f"archive {name!r} holds two files named {member_name!r}", param="archive",
                           code="duplicate_name")
        budget.add_file(member_name)
        copy_limited(stream, dest / member_name, member_name, budget, limit)
        written.append(member_name)

    try:
        if kind == "zip":
            with zipfile.ZipFile(src) as zf:
                for info in zf.infolist():
                    member = _member_name(info.filename, name, param)
                    if member is None or info.is_dir():
                        continue
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise ApiError(422, f"archive {name!r} holds a symbolic link {info.filename!r}",
                                       param=param, code="unsafe_archive_path")
                    limit = int(max(info.compress_size, 1) * settings.max_archive_ratio)
                    with zf.open(info) as stream:
                        take(member, stream, limit)
        else:
            with tarfile.open(fileobj=src, mode="r:*") as tf:
                for info in tf:  # streaming: one member at a time
                    member = _member_name(info.name, name, param)
                    if info.isdir() or member is None:
                        continue
                    if not info.isfile():
                        raise ApiError(422, f"archive {name!r} holds {info.name!r}, which is a link or "
                                            "device, not a file", param=param, code="unsafe_archive_path")
                    stream = tf.extractfile(info)
                    take(member, stream, int(ratio_total))
                    if budget.total > ratio_total:
                        raise ApiError(413, f"archive {name!r} expands beyond {settings.max_archive_ratio:.0f}x "
                                            "its size (TARQ_MAX_ARCHIVE_RATIO); refusing a possible zip bomb",
                                       param=param, code="archive_ratio")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise ApiError(422, f"archive {name!r} is corrupt: {err}", param=param, code="bad_archive") from None
    return written


def stage_uploads(folder: Path, budget: Budget, files: list, archive, files_field: str, archive_field: str,
                  reserved: tuple[str, ...] = ()) -> tuple[list[str], set[str]]:
    """Write repeated file fields and the members of one archive, flat, into folder (made here).
    Returns (every name written, the names that came from the archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    from_archive: set[str] = set()
    for upload in files:
        name = safe_name(upload.filename, files_field)
        if name in names or name in reserved:
            raise ApiError(422, f"field {files_field!r}: file name {name!r} appears twice", param=files_field,
                           code="duplicate_name")
        budget.add_file(name)
        copy_limited(upload.file, folder / name, name, budget)
        names.append(name)
    if archive is not None:
        arch_name = safe_name(archive.filename, archive_field)
        # read where the multipart parser spooled it: a copy would need the archive's size again in disk
        for member in extract_archive(archive.file, arch_name, folder, budget, param=archive_field):
            if member in names:
                raise ApiError(422, f"file name {member!r} appears both in {archive_field!r} and "
                                    f"{files_field!r}", param=archive_field, code="duplicate_name")
            names.append(member)
            from_archive.add(member)
    return names, from_archive


def stage_set(
    folder: Path,
    budget: Budget,
    *,
    files: list,
    archive=None,
    transcripts=None,
    files_field: str = "files",
    archive_field: str = "archive",
    transcripts_field: str = "transcripts",
) -> Staged:
    """Stage one clip set (calibration or evaluation) from repeated files and/or one archive, then check
    every clip decodes and the transcripts parse. `files`/`archive`/`transcripts` are UploadFiles."""
    settings = budget.settings
    staged = Staged(folder)
    names, from_archive = stage_uploads(folder, budget, files, archive, files_field, archive_field,
                                        reserved=(TRANSCRIPTS,))
    if transcripts is not None:
        tname = safe_name(transcripts.filename or TRANSCRIPTS, transcripts_field)
        if TRANSCRIPTS in names:
            names.remove(TRANSCRIPTS)
        budget.add_file(tname)
        copy_limited(transcripts.file, folder / TRANSCRIPTS, tname, budget)
    elif TRANSCRIPTS not in names:
        # A .tsv inside an archive under another name counts as its transcripts.
        tsvs = [n for n in names if n.lower().endswith(".tsv")]
        if len(tsvs) == 1:
            (folder / tsvs[0]).rename(folder / TRANSCRIPTS)
            names[names.index(tsvs[0])] = TRANSCRIPTS

    extensions = audio_extensions()
    for name in names:
        if name == TRANSCRIPTS:
            continue
        path = folder / name
        if name in from_archive and path.suffix.lower() not in extensions:
            path.unlink()  # stray non-audio files in an archive (READMEs, licences) are ignored
            continue
        staged.seconds += check_audio(path, name, settings, archive_field if name in from_archive else files_field)
        staged.clips.append(name)
    if not staged.clips:
        raise ApiError(422, f"no audio clips given: send them as repeated {files_field!r} fields or one "
                            f"{archive_field!r}", param=files_field, code="no_audio")
    if (folder / TRANSCRIPTS).exists():
        check_transcripts(folder / TRANSCRIPTS, staged.clips, transcripts_field)
        staged.transcripts = True
    return staged


def check_transcripts(path: Path, clips: list[str], field_name: str) -> None:
    """Every line names an uploaded clip (by its file name, or its stem when that is unambiguous); the
    file is rewritten keyed by the clips' file names. Before, a transcript keyed by a stem passed this
    check and was then not found by the worker, which silently used a pseudo-label instead."""
    from tarq.audio import read_transcripts
    from tarq.errors import TarqError

    try:
        table = read_transcripts(path)
    except (TarqError, ValueError, UnicodeDecodeError) as err:
        raise ApiError(422, f"transcripts file is not a valid tsv (file<TAB>text): {err}", param=field_name,
                       code="bad_transcripts") from None
    if not table:
        raise ApiError(422, "transcripts file holds no lines", param=field_name, code="bad_transcripts")
    by_stem: dict[str, list[str]] = {}
    for clip in clips:
        by_stem.setdefault(Path(clip).stem, []).append(clip)
    named, missing = {}, []
    for key, text in table.items():
        key = str(key)
        if key in clips or Path(key).name in clips:
            named[Path(key).name] = text
        elif len(by_stem.get(key, ())) == 1:  # "clip1" for clip1.flac
            named[by_stem[key][0]] = text
        elif key in by_stem:
            raise ApiError(422, f"transcripts file lists {key!r}, which could be any of {', '.join(by_stem[key])}: "
                                "name the file", param=field_name, code="bad_transcripts")
        else:
            missing.append(key)
    # the library refuses a transcripts file that lists clips it cannot find: refuse it here, before queueing
    if missing:
        raise ApiError(422, f"transcripts file lists {sorted(missing)[0]!r}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which is not among "
                            "the uploaded clips", param=field_name, code="bad_transcripts")
    # stored under the clips' own names: the worker looks a clip's reference up by its file name
    path.write_text("".join(f"{name}\t{text}\n" for name, text in named.items()), encoding="utf-8")


# the model field ---------------------------------------------------------------------------------------
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_source(model: str, settings: Settings, param: str = "model") -> str:
    """A Hub id, or a folder under one of TARQ_MODEL_ROOTS (absolute, or relative to a root) that holds
    a safetensors Whisper model. Returns the Hub id or the resolved folder; ApiError(422) otherwise."""
    model = (model or "").strip()
    if not model:
        raise ApiError(422, f"field {param!r} is empty: give a Hub id or a folder under TARQ_MODEL_ROOTS",
                       param=param, code="bad_model")
    roots = settings.roots
    path_like = model.startswith(("/", "./", "../", "~")) or "\\" in model or ".." in model.split("/")
    if not path_like:
        for root in roots:
            if (root / model).is_dir():
                path_like, model = True, str(root / model)
                break
    if path_like:
        path = Path(model).expanduser().resolve()  # resolves symlinks: a link out of a root stays out
        if not any(path == root or path.is_relative_to(root) for root in roots):
            raise ApiError(422, f"model path {model!r} is outside the allowed model roots (TARQ_MODEL_ROOTS"
                                f"{' is empty' if not roots else ''})", param=param, code="model_outside_roots")
        check_model_folder(path, model, param)
        return str(path)
    if not HUB_ID.match(model):
        raise ApiError(422, f"model {model!r} is neither a Hugging Face Hub id (org/name) nor a folder under "
                            "TARQ_MODEL_ROOTS", param=param, code="bad_model")
    check_hub_model(model, settings, param)
    return model


def check_model_folder(path: Path, shown: str, param: str = "model") -> None:
    import json

    if not path.is_dir():
        raise ApiError(422, f"model folder {shown!r} does not exist", param=param, code="model_not_found")
    config = path / "config.json"
    if not config.is_file():
        raise ApiError(422, f"folder {shown!r} is not a model: it has no config.json", param=param,
                       code="not_a_model")
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise ApiError(422, f"folder {shown!r}: config.json is not valid JSON ({err})", param=param,
                       code="not_a_model") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"folder {shown!r}: config.json is not a JSON object", param=param, code="not_a_model")
    if data.get("auto_map") or data.get("trust_remote_code"):
        raise ApiError(422, f"model {shown!r} asks for remote code (auto_map); tarq never runs remote code",
                       param=param, code="remote_code")
    if data.get("model_type") != "whisper":
        raise ApiError(422, f"folder {shown!r} is not a Whisper model (model_type {data.get('model_type')!r})",
                       param=param, code="not_whisper")
    if not any(path.glob("*.safetensors")):
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise ApiError(422, f"model {shown!r} has only pickle weights (.bin/.pt); tarq loads safetensors only",
                           param=param, code="pickle_weights")
        raise ApiError(422, f"folder {shown!r} is not a model: it has no .safetensors weights", param=param,
                       code="not_a_model")


def check_hub_model(model_id: str, settings: Settings, param: str = "model") -> None:
    """The Hub id exists (or is already cached here). huggingface_hub is torch-free."""
    import os

    try:
        import huggingface_hub
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError:
        return  # cannot check from the API host; the worker reports a clear ModelError instead
    if isinstance(huggingface_hub.try_to_load_from_cache(model_id, "config.json"), str):
        return
    if settings.hub_offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ApiError(422, f"model {model_id!r} is not in this server's Hub cache and the server is offline "
                            "(TARQ_HUB_OFFLINE)", param=param, code="model_not_found")
    try:
        huggingface_hub.model_info(model_id, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError):
        raise ApiError(422, f"model {model_id!r} does not exist on the Hugging Face Hub (or is gated)",
                       param=param, code="model_not_found") from None
    except HfHubHTTPError as err:
        raise ApiError(422, f"model {model_id!r}: the Hub refused the lookup ({str(err).splitlines()[0]})",
                       param=param, code="model_not_found") from None
    except Exception as err:  # network down, DNS: the Hub is unreachable from here
        raise ApiError(422, f"model {model_id!r} could not be checked: the Hugging Face Hub is unreachable from "
                            f"this server ({type(err).__name__}); use a folder under TARQ_MODEL_ROOTS",
                       param=param, code="hub_unreachable") from None


# uploaded model folders (POST /v1/models) ----------------------------------------------------------------
# What transformers reads of a Whisper folder, and its model card; anything else (pickles, flax/tf weights) is
# left out.
MODEL_KEEP = ("*.json", "*.safetensors", "merges.txt", "README.md")
# each entry: one of these names (transformers 5 writes the feature extractor into processor_config.json)
MODEL_NEEDS = (("config.json",), ("preprocessor_config.json", "processor_config.json"), ("tokenizer_config.json",))


def stage_model(folder: Path, budget: Budget, *, files: list, archive=None, shown: str = "the upload") -> list[str]:
    """Stage a model folder sent as repeated `files` and/or one `archive` (flattened: a folder at the
    archive's top is fine), check it as a server folder is checked (Whisper, safetensors, no remote
    code), that the processor files came along and that every safetensors file is whole, then drop what
    transformers does not read. Returns the names kept; ApiError (422/413/415) names the problem."""
    names, _ = stage_uploads(folder, budget, files, archive, "files", "archive")
    param = "archive" if archive is not None and not files else "files"
    if not names:
        raise ApiError(422, "no model files given: send the folder's files as repeated 'files' fields or one "
                            "'archive' (zip, tar, tar.gz)", param="files", code="no_files")
    check_model_folder(folder, shown, param)
    missing = [" or ".join(options) for options in MODEL_NEEDS if not set(options) & set(names)]
    if missing:
        raise ApiError(422, f"model {shown!r} lacks {', '.join(missing)}: send the processor and tokenizer files "
                            "with the weights (what WhisperProcessor.save_pretrained writes)", param=param,
                       code="incomplete_model")
    kept = [n for n in names if any(PurePosixPath(n).match(pattern) for pattern in MODEL_KEEP)]
    for name in kept:
        if name.endswith(".safetensors"):
            check_safetensors(folder / name, name, param)
    for name in set(names) - set(kept):
        (folder / name).unlink()
    return sorted(kept)


def check_safetensors(path: Path, name: str, param: str) -> None:
    """The header parses and its tensors cover the file exactly (a truncated upload fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as err:
        raise ApiError(422, f"{name} is not a valid safetensors file: {err}", param=param,
                       code="bad_weights") from None
