"""`tarq eval`: WER, rare-WER and common-WER of a model (or quantized artifact) on a folder of speech.

The folder holds audio in any format tarq.audio decodes and a `transcripts.tsv` (`file<TAB>text`).
References are the raw transcripts.tsv text: both sides go through Whisper's English normalizer
inside tarq.metrics.score, so digits and spelled-out numbers compare equal (LJSpeech's
transcripts_normalized.tsv is therefore not needed). Decoding is tarq.transcribe.transcribe_batch:
greedy, English, no prompt, the same for every model, so methods differ only in their weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tarq.audio import SAMPLE_RATE, load_audio, read_transcripts
from tarq.errors import AudioError, CalibrationError

if TYPE_CHECKING:  # jiwer is the ml extra's: `tarq remote eval` formats results without it
    from tarq.metrics import Scores

TRANSCRIPTS = "transcripts.tsv"


@dataclass
class EvalResult:
    """Rates in percent (None when there is nothing to divide by). `seconds` is the wall time of
    decoding and scoring (model loading excluded, see `load_seconds`); `audio_seconds` the length of
    the evaluated speech."""

    model: str
    data: str
    wer: float | None
    rare_wer: float | None
    common_wer: float | None
    utterances: int
    words: int
    rare_words: int
    seconds: float
    audio_seconds: float
    load_seconds: float = 0.0
    batch_size: int = 8
    zipf_threshold: float = 3.0
    hypotheses: dict[str, str] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The headline numbers without per-file hypotheses (for model cards and tables)."""
        return {k: v for k, v in asdict(self).items() if k not in ("hypotheses", "scores")}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def references(
    data_dir: str | Path, files: list[str] | None = None, limit: int | None = None
) -> dict[str, str]:
    """{file: reference text} from data_dir/transcripts.tsv, in the file's order, restricted to
    `files` (names as written there) and then to the first `limit`."""
    data_dir = Path(data_dir)
    tsv = data_dir / TRANSCRIPTS
    if not data_dir.is_dir():
        raise CalibrationError(f"{data_dir}: evaluation data folder not found")
    if not tsv.is_file():
        raise CalibrationError(f"{data_dir}: no {TRANSCRIPTS} (file<TAB>reference text) to score against")
    refs = read_transcripts(tsv)
    if files is not None:
        unknown = [f for f in files if f not in refs]
        if unknown:
            raise CalibrationError(f"{tsv}: no reference for {unknown[0]}")
        refs = {f: refs[f] for f in files}
    if limit is not None:
        refs = dict(list(refs.items())[:limit])
    if not refs:
        raise CalibrationError(f"{tsv}: no utterances to evaluate")
    return refs


def score_hypotheses(
    refs: dict[str, str], hyps: dict[str, str], *, zipf_threshold: float = 3.0
) -> Scores:
    """Score hypotheses for exactly the files of `refs` (the same utterances for every method)."""
    from tarq.metrics import score

    missing = [f for f in refs if f not in hyps]
    if missing:
        raise ValueError(f"no hypothesis for {missing[0]}")
    names = list(refs)
    return score([refs[f] for f in names], [hyps[f] for f in names], zipf_threshold=zipf_threshold)


def evaluate(
    source: str | Path,
    data_dir: str | Path,
    *,
    batch_size: int = 8,
    files: list[str] | None = None,
    zipf_threshold: float = 3.0,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    loaded: tuple[Any, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Transcribe every clip of data_dir/transcripts.tsv (or `files`, or the first `limit`) with
    `source` (a model folder, Hub id or tarq artifact; `loaded` = (model, processor) skips loading)
    and score it. A missing or undecodable clip raises AudioError naming it. `progress(done, total)`
    is called after each batch."""
    from tarq.transcribe import load, transcribe_batch  # torch only when evaluating

    data_dir = Path(data_dir)
    refs = references(data_dir, files, limit)
    for name in refs:  # fail before the model loads, not minutes into decoding
        if not (data_dir / name).is_file():
            raise AudioError(f"{data_dir / name}: listed in {TRANSCRIPTS} but not found")

    t0 = time.perf_counter()
    model, processor = loaded if loaded is not None else load(source, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    names = list(refs)
    hyps: dict[str, str] = {}
    audio_seconds = 0.0
    for lo in range(0, len(names), batch_size):
        chunk = names[lo : lo + batch_size]
        audios = [load_audio(data_dir / name) for name in chunk]
        audio_seconds += sum(len(a) for a in audios) / SAMPLE_RATE
        texts = transcribe_batch(model, processor, audios, language="en", batch_size=batch_size)
        hyps.update(zip(chunk, texts))
        if progress is not None:
            progress(len(hyps), len(names))
    scores = score_hypotheses(refs, hyps, zipf_threshold=zipf_threshold)
    seconds = time.perf_counter() - t0

    return EvalResult(
        model=str(source), data=str(data_dir), wer=scores.wer, rare_wer=scores.rare_wer,
        common_wer=scores.common_wer, utterances=scores.utterances, words=scores.words,
        rare_words=scores.rare_words, seconds=round(seconds, 3), audio_seconds=round(audio_seconds, 3),
        load_seconds=round(load_seconds, 3), batch_size=batch_size, zipf_threshold=zipf_threshold,
        hypotheses=hyps, scores=scores.to_dict(),
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_table(results: list[EvalResult]) -> str:
    """A plain-text table, one row per result (markdown-compatible)."""
    header = ["model", "utterances", "words", "rare words", "WER %", "rare-WER %", "common-WER %", "seconds"]
    rows = [
        [r.model, str(r.utterances), str(r.words), str(r.rare_words), _pct(r.wer), _pct(r.rare_wer),
         _pct(r.common_wer), f"{r.seconds:.1f}"]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def attach_metrics(artifact_dir: str | Path, base_model: str | Path, data_dir: str | Path, *,
                   device: str = "cpu", batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Evaluate the base model and the quantized artifact on the same clips and record both in the
    artifact (config.json's tarq section and its model card). Returns {"fp": ..., "quantized": ...}."""
    from tarq.artifact import update_metrics

    fp = evaluate(base_model, data_dir, batch_size=batch_size, device=device)
    quantized = evaluate(artifact_dir, data_dir, batch_size=batch_size, device=device)
    keys = ("wer", "rare_wer", "common_wer", "utterances", "words", "rare_words", "seconds")
    metrics = {
        "fp": {k: getattr(fp, k) for k in keys},
        "quantized": {k: getattr(quantized, k) for k in keys},
    }
    update_metrics(artifact_dir, metrics)
    return metrics
