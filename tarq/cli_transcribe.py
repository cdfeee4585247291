"""`tarq transcribe` and `tarq eval` (registered on the `tarq` group in tarq/cli.py).

Errors a user can cause (TarqError) print one line and exit 1; tracebacks are for bugs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tarq.config import (
    COMPRESSION_RATIO_THRESHOLD,
    DTYPES,
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    TEMPERATURE_INCREMENT,
)
from tarq.errors import TarqError
from tarq.formats import FORMATS


def _device(device: str) -> str:
    from tarq.cli import _check_device  # noqa: PLC0415 -- cli imports this module at its end

    return _check_device(device)


def _quiet_transformers() -> None:
    # Its per-load "Loading weights" bar would interleave with our output and progress bar, and every
    # generate call warns about how Whisper's own generate passes its arguments (three lines per clip that
    # no user can act on); errors still print.
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def dtype_option(default: str):
    return click.option(
        "--dtype", type=click.Choice(DTYPES), default=default, show_default=True,
        help="Compute dtype. auto: float16 on CUDA, bfloat16 on CPUs where a bf16 matmul measures faster than "
        "float32 (with AMX about 2x), else float32.")


@click.command()
@click.argument("model")
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Output format, as OpenAI's response_format.")
@click.option("--language", default=None, help="Language code (multilingual models; detected when omitted).")
@click.option("--prompt", default=None, help="Text to condition the first window on (spellings, names).")
@click.option("--temperature", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True)
@click.option("--word-timestamps", is_flag=True, help="Add word timings (verbose_json shows them).")
@click.option("--no-speech-threshold", type=click.FloatRange(0.0, 1.0), default=NO_SPEECH_THRESHOLD, show_default=True,
              help="Leave out a window whose no-speech probability is above this and whose tokens average a "
                   "log-probability below --logprob-threshold (Whisper's own text on silence); 1 keeps every window.")
@click.option("--logprob-threshold", type=float, default=LOGPROB_THRESHOLD, show_default=True)
@click.option("--temperature-increment-on-fallback", "temperature_increment", type=click.FloatRange(0.0, 1.0),
              default=0.0, show_default=True,
              help=f"Decode a window again this much hotter (up to 1.0) when its text loops (--compression-ratio-"
                   f"threshold) or its tokens average a log-probability below --logprob-threshold; "
                   f"{TEMPERATURE_INCREMENT} is openai/whisper's (OpenAI's API at temperature 0), 0 leaves it off.")
@click.option("--compression-ratio-threshold", type=click.FloatRange(0.0, min_open=True),
              default=COMPRESSION_RATIO_THRESHOLD, show_default=True)
@click.option("--task", type=click.Choice(["transcribe", "translate"]), default="transcribe", show_default=True,
              help="translate: into English (multilingual models).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@dtype_option("auto")
def transcribe(model, audio, fmt, language, prompt, temperature, word_timestamps, no_speech_threshold,
               logprob_threshold, temperature_increment, compression_ratio_threshold, task, device, dtype):
    """Transcribe AUDIO files with MODEL (a model folder, Hub id, cached name or tarq artifact).

    One file prints the body alone; several print JSON keyed by file (json formats) or each body
    under a `==> file <==` header (text formats)."""
    from tarq.audio import load_audio
    from tarq.formats import render
    from tarq.qlinear import counting_kernels
    from tarq.transcribe import dtype_name, load
    from tarq.transcribe import transcribe as run

    try:
        device = _device(device)
        clips = {str(path): load_audio(path) for path in audio}  # a bad file fails before the model loads
        _quiet_transformers()
        loaded_model, processor = load(model, device=device, dtype=dtype)
        granularities = ("segment", "word") if word_timestamps else ("segment",)
        bodies = {}
        with counting_kernels(loaded_model) as kernels:
            for name, clip in clips.items():
                transcript = run(loaded_model, processor, clip, language=language, prompt=prompt,
                                 temperature=temperature, word_timestamps=word_timestamps, task=task,
                                 no_speech_threshold=no_speech_threshold, logprob_threshold=logprob_threshold,
                                 temperature_increment=temperature_increment,
                                 compression_ratio_threshold=compression_ratio_threshold)
                bodies[name] = render(transcript, fmt, granularities=granularities)[0]
    except TarqError as e:
        raise click.ClickException(str(e)) from None
    # on stderr: stdout stays the transcript alone
    if dtype == "auto":
        click.echo(f"compute dtype: {dtype_name(loaded_model.dtype)} (--dtype auto on {device})", err=True)
    if kernels:
        click.echo("int4 layers ran: " + ", ".join(f"{k} {n} calls" for k, n in kernels.items()), err=True)
    if fmt in ("json", "verbose_json"):
        out = next(iter(bodies.values())) if len(bodies) == 1 else bodies
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    for name, body in bodies.items():
        if len(bodies) > 1:
            click.echo(f"==> {name} <==")
        click.echo(body, nl=False)


@click.command("eval")
@click.argument("model")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of audio + transcripts.tsv (file<TAB>reference).")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Write the result (with hypotheses) here.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Only the first N clips of transcripts.tsv.")
@click.option("--zipf-threshold", type=float, default=3.0, show_default=True,
              help="Rare = Zipf frequency below this.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@dtype_option("float32")  # scores compare across hosts; transcription picks what is fast here
def eval_command(model, data_dir, json_out, batch_size, limit, zipf_threshold, device, dtype):
    """WER, rare-WER and common-WER of MODEL on --data (greedy, English, normalized text)."""
    from tqdm import tqdm

    from tarq.evaluate import evaluate, format_table

    bar = tqdm(total=0, unit="clip", file=sys.stderr, dynamic_ncols=True, desc="eval")

    def show(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        device = _device(device)
        _quiet_transformers()
        result = evaluate(model, data_dir, batch_size=batch_size, limit=limit, zipf_threshold=zipf_threshold,
                          device=device, dtype=dtype, progress=show)
    except TarqError as e:
        raise click.ClickException(str(e)) from None
    finally:
        bar.close()
    click.echo(format_table([result]))
    if json_out is not None:
        click.echo(f"wrote {result.write_json(json_out)}", err=True)
