"""Word timestamps for a known transcript: Whisper's cross-attention alignment heads + DTW, the
method of openai/whisper's timing.py, on a teacher-forced decode. Used to tag encoder frames."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .errors import ModelError

FRAMES_PER_SECOND = 50  # encoder positions per second of audio


@contextmanager
def eager_attention(model):
    """Attention weights are only returned by the eager implementation."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def alignment_heads(model) -> list[tuple[int, int]]:
    heads = getattr(model.generation_config, "alignment_heads", None)
    if not heads:
        raise ModelError("this model has no alignment heads in its generation config: word timestamps "
                         "(and encoder frame tagging) need them")
    return [tuple(h) for h in heads]


@torch.no_grad()
def word_spans(model, tokenizer, features: torch.Tensor, sequences: list[list[int]],
               durations: list[float]) -> list[list[tuple[str, float, float]]]:
    """For each clip, (word, start s, end s) of its transcript. `sequences` are full decoder token
    sequences (prompt + text + end-of-text) as calibrate.token_ids builds them."""
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

    heads = alignment_heads(model)
    special = set(tokenizer.all_special_ids)
    out = []
    with eager_attention(model):
        for i, seq in enumerate(sequences):
            prompt = next(k for k, t in enumerate(seq) if t not in special)  # first text token
            text = seq[prompt:-1]
            if not text:
                out.append([])
                continue
            ids = torch.tensor([seq], device=features.device)
            res = model(input_features=features[i:i + 1], decoder_input_ids=ids, output_attentions=True,
                        use_cache=False)
            frames = max(1, min(int(durations[i] * FRAMES_PER_SECOND), res.cross_attentions[0].shape[-1]))
            w = torch.stack([res.cross_attentions[layer][0, head] for layer, head in heads])[:, :, :frames]
            w = (w - w.mean(dim=-2, keepdim=True)) / (w.std(dim=-2, keepdim=True, unbiased=False) + 1e-8)
            w = _median_filter(w.float(), model.config.median_filter_width).mean(dim=0)
            # rows: the position before the first text token (it predicts that token) .. the last text token
            matrix = w[prompt - 1:len(seq) - 1]
            text_idx, time_idx = _dynamic_time_warping(-matrix.double().cpu().numpy())
            jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
            jump_times = time_idx[jumps] / FRAMES_PER_SECOND
            out.append(_words(tokenizer, text, jump_times))
    return out


def _words(tokenizer, text: list[int], jump_times: np.ndarray) -> list[tuple[str, float, float]]:
    """Group BPE pieces into words (a piece that starts with a space starts a word) and time them."""
    words: list[tuple[str, int, int]] = []  # (word, first piece, one past last piece)
    for k, tok in enumerate(text):
        piece = tokenizer.decode([tok])
        if not words or piece.startswith(" "):
            words.append((piece.strip(), k, k + 1))
        else:
            w, s, _ = words[-1]
            words[-1] = (w + piece, s, k + 1)
    spans = []
    for w, s, e in words:
        start = float(jump_times[min(s, len(jump_times) - 1)])
        end = float(jump_times[min(e, len(jump_times) - 1)])
        spans.append((w, start, max(end, start)))
    return spans
