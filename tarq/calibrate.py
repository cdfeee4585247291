"""Calibration data: audio clips -> log-mel features, teacher-forcing token sequences, tail tags.

Transcripts come from a transcripts.tsv when given; clips without one are transcribed by the
full-precision model itself (greedy pseudo-labels), so audio alone is enough.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, list_audio, load_audio, read_transcripts
from .config import QuantConfig
from .errors import CalibrationError
from .models.whisper import is_multilingual
from .tagging import frame_tail_mask, special_mask, token_tail_mask

SECONDS_PER_FRAME = 0.02  # one encoder position per 20 ms (30 s -> 1500)


@dataclass
class CalibSample:
    name: str
    audio: np.ndarray
    text: str | None = None


def load_samples(calib: Path, num_samples: int, seed: int = 0) -> list[CalibSample]:
    """Up to `num_samples` clips of a folder, drawn with `seed`, with their transcripts if the folder
    has a transcripts.tsv (file<TAB>text)."""
    calib = Path(calib)
    if not calib.is_dir():
        raise CalibrationError(f"calibration folder {calib} does not exist")
    files = list_audio(calib)
    if not files:
        raise CalibrationError(f"calibration folder {calib} holds no audio files")
    if len(files) > num_samples:
        files = sorted(random.Random(seed).sample(files, num_samples))
    tsv = calib / "transcripts.tsv"
    texts = read_transcripts(tsv) if tsv.exists() else {}
    return [CalibSample(f.name, load_audio(f), texts.get(f.name)) for f in files]


def prompt_kwargs(model) -> dict:
    """English transcription for multilingual models; English-only models refuse these arguments."""
    return {"language": "en", "task": "transcribe"} if is_multilingual(model) else {}


def features(processor, audios: list[np.ndarray], device, dtype) -> torch.Tensor:
    out = processor.feature_extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    return out.input_features.to(device=device, dtype=dtype)


MAX_TOKENS_PER_SECOND = 10  # fast speech stays under ~7; more is a repetition loop, not speech


@torch.no_grad()
def pseudo_labels(model, processor, feats: torch.Tensor, seconds: list[float], batch_size: int) -> list[str]:
    """The full-precision model's own greedy transcription, used where no reference exists. Length is
    capped by the clip's duration so that a hallucination loop cannot become calibration text."""
    texts: list[str] = []
    for i in range(0, len(feats), batch_size):
        cap = int(MAX_TOKENS_PER_SECOND * max(seconds[i:i + batch_size])) + 8
        ids = model.generate(feats[i:i + batch_size], do_sample=False, num_beams=1,
                             max_new_tokens=min(cap, model.config.max_target_positions - 8), **prompt_kwargs(model))
        texts += processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [t.strip() for t in texts]


def token_ids(model, tokenizer, text: str) -> list[int]:
    """Prompt + text + end-of-text, as the decoder sees it when transcribing without timestamps."""
    if is_multilingual(model):
        tokenizer.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
    else:
        tokenizer.set_prefix_tokens(language=None, task=None, predict_timestamps=False)
    ids = tokenizer(" " + text.strip()).input_ids
    return ids[: model.config.max_target_positions + 1]


@dataclass
class CalibData:
    """Everything the sequential driver needs, padded into tensors of equal length."""

    features: torch.Tensor  # [N, mels, 3000]
    input_ids: torch.Tensor  # [N, T] decoder inputs (teacher forcing), padded with end-of-text
    token_mask: torch.Tensor  # [N, T] bool, real positions
    token_tail: torch.Tensor  # [N, T] bool
    token_prompt: torch.Tensor  # [N, T] bool, positions that read a special token (the decoder prompt)
    frame_tail: torch.Tensor  # [N, frames] bool
    texts: list[str]
    names: list[str]
    pseudo_labelled: int = 0
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


@torch.no_grad()
def prepare(model, processor, samples: list[CalibSample], config: QuantConfig, device, dtype) -> CalibData:
    if not samples:
        raise CalibrationError("no calibration clips")
    feats = features(processor, [s.audio for s in samples], device, dtype)
    texts = [s.text for s in samples]
    missing = [i for i, t in enumerate(texts) if not t]
    if missing:
        labels = pseudo_labels(model, processor, feats[missing],
                               [len(samples[i].audio) / SAMPLE_RATE for i in missing], config.batch_size)
        for i, text in zip(missing, labels):
            texts[i] = text

    tok = processor.tokenizer
    seqs = [token_ids(model, tok, t) for t in texts]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    T = max(len(s) for s in seqs) - 1
    n = len(seqs)
    input_ids = torch.full((n, T), eot, dtype=torch.long)
    token_mask = torch.zeros(n, T, dtype=torch.bool)
    token_tail = torch.zeros(n, T, dtype=torch.bool)
    token_prompt = torch.zeros(n, T, dtype=torch.bool)
    for i, ids in enumerate(seqs):
        tags = token_tail_mask(tok, ids, config.zipf_threshold, config.digits_are_tail)
        L = len(ids) - 1
        input_ids[i, :L] = torch.tensor(ids[:-1])
        token_mask[i, :L] = True
        # A position is tail when it reads or predicts a piece of a rare word: the logits that emit a rare
        # word's first piece come from the position before it.
        token_tail[i, :L] = torch.tensor([a or b for a, b in zip(tags[:-1], tags[1:])])
        token_prompt[i, :L] = torch.tensor(special_mask(tok, ids[:-1]))

    frames = model.config.max_source_positions
    frame_tail = torch.zeros(n, frames, dtype=torch.bool)
    if config.method == "tarq" and config.encoder_tagging == "frames":
        from .alignment import word_spans

        for i in range(0, n, config.batch_size):
            spans = word_spans(model, tok, feats[i:i + config.batch_size], seqs[i:i + config.batch_size],
                               [len(s.audio) / SAMPLE_RATE for s in samples[i:i + config.batch_size]])
            for j, words in enumerate(spans):
                frame_tail[i + j] = torch.tensor(frame_tail_mask(
                    words, frames, SECONDS_PER_FRAME, config.zipf_threshold, config.digits_are_tail))

    info = {
        "clips": n,
        "pseudo_labelled": len(missing),
        "tokens": int(token_mask.sum()),
        "tail_tokens": int((token_tail & token_mask).sum()),
        "tail_frames": int(frame_tail.sum()),
        "seconds_of_audio": round(sum(len(s.audio) for s in samples) / SAMPLE_RATE, 2),
    }
    return CalibData(feats, input_ids.to(device), token_mask.to(device), token_tail.to(device),
                     token_prompt.to(device), frame_tail.to(device), texts, [s.name for s in samples], len(missing), info)
