"""openai/whisper's temperature fallback (what OpenAI's API does at temperature 0) inside transformers'
`generate`: a window whose text loops (its zlib compression ratio is above 2.4) or whose tokens average a
log-probability below -1.0 is decoded again at the next temperature of 0.0, 0.2, ..., 1.0, sampling,
unless Whisper calls the window silent (then a retry could only make up text for it). tarq leaves it off
unless asked for (tarq.config.TEMPERATURE_INCREMENT).

transformers runs the ladder itself when `generate` gets a tuple of temperatures, but judges each attempt
by a compression ratio of token ids (not of the text that openai's 2.4 was set on), without the silence
exemption unless it runs a no-speech step of its own, and hands every attempt the same `cache`, which the
first attempt has already grown. `applied(model, rule)` runs each window's ladder through this module's
`Rule` instead, for the calling thread: transformers' generate_with_fallback once per temperature (its
decoding, logits processors and segment bookkeeping as they are), judged as openai/whisper does, with the
self-attention part of a shared cache emptied before a retry so that the cross-attention keys and values
computed once are decoded on afresh.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import types
import zlib
from collections.abc import Callable
from contextlib import contextmanager

import torch

log = logging.getLogger("tarq.fallback")
_active = threading.local()  # the Rule of the transcription this thread runs, if any
_install_lock = threading.Lock()
# what _generate_with_rule reads of transformers' generate_with_fallback's arguments
_NEEDED = ("cur_bsz", "temperatures", "generation_config", "do_condition_on_prev_tokens")


def temperatures(temperature: float, increment: float | None) -> tuple[float, ...]:
    """openai/whisper's ladder: `temperature`, then up by `increment` while at most 1.0 (0.0 -> 0.0, 0.2,
    ..., 1.0); just (temperature,) when increment is None or 0."""
    if not 0.0 <= temperature <= 1.0:
        raise ValueError(f"temperature must be in [0, 1], not {temperature}")
    if increment is None or increment == 0:
        return (float(temperature),)
    if not 0.0 < increment <= 1.0:
        raise ValueError(f"the temperature increment on fallback must be in (0, 1] (0 or None: no fallback), "
                         f"not {increment}")
    steps = math.floor((1.0 - temperature) / increment + 1e-6)
    return tuple(round(temperature + i * increment, 6) for i in range(steps + 1))


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)) in UTF-8 bytes: openai/whisper's loop detector (a loop compresses well)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def token_logprobs(scores, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log P(tokens[i]) under scores[i] (generate's filtered scores, each [vocab] or [1, vocab]) in float32,
    read at temperature 1: sampling divided the scores by `temperature`."""
    scale = temperature if temperature > 0 else 1.0
    logits = torch.stack([s.reshape(-1, s.shape[-1])[0] for s in scores]).float() * scale
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.to(logits.device).long().unsqueeze(-1)).squeeze(-1)


def avg_logprob(scores, sequence: torch.Tensor, temperature: float) -> float:
    """Mean log-probability of the generated tokens (<|endoftext|> included, as openai/whisper counts it)
    under the filtered scores, undoing the temperature the scores were divided by."""
    steps = min(len(scores), sequence.shape[-1])
    if steps == 0:
        return 0.0
    return float(token_logprobs(scores[:steps], sequence[-steps:], temperature).mean())


def needs_fallback(text: str, logprob: float, no_speech: float | None, *,
                   compression_ratio_threshold: float | None, logprob_threshold: float | None,
                   no_speech_threshold: float | None) -> bool:
    """openai/whisper's rule for one decoded window: too repetitive or too unlikely, and not silence (a
    window with P(no speech) above its threshold and a log-probability below its own: left out anyway)."""
    looped = compression_ratio_threshold is not None and compression_ratio(text) > compression_ratio_threshold
    return _verdict(looped, logprob, no_speech, logprob_threshold, no_speech_threshold)


def _verdict(looped: bool, logprob: float, no_speech: float | None, logprob_threshold: float | None,
             no_speech_threshold: float | None) -> bool:
    unlikely = logprob_threshold is not None and logprob < logprob_threshold
    silent = no_speech_threshold is not None and no_speech is not None and no_speech > no_speech_threshold \
        and unlikely
    return (looped or unlikely) and not silent


class Rule:
    """The fallback rule for one transcription. `window()` is the index of the window being decoded,
    `no_speech(output)` its no-speech probability (None where unknown) given an attempt's output; `cache`
    a cache handed to generate that holds precomputed cross-attention keys and values, emptied of its
    self-attention part before a retry.

    Where every attempt fails, the window keeps the last, sampled at 1.0, as openai/whisper does; with
    `keep="best"` the attempt with the highest mean log-probability among those that do not loop (among all
    if every one loops), as faster-whisper does. Neither scored better on real speech
    (bench/results/fallback.md), so the default is the behaviour the fallback is there to reproduce."""

    def __init__(self, tokenizer, eot: int, *, window: Callable[[], int],
                 no_speech: Callable[[dict], float | None], compression_ratio_threshold: float | None,
                 logprob_threshold: float | None, no_speech_threshold: float | None, cache=None,
                 keep: str = "last"):
        if keep not in ("best", "last"):
            raise ValueError(f"keep must be best or last, not {keep!r}")
        self.tokenizer, self.eot, self.keep = tokenizer, eot, keep
        self.window, self.no_speech, self.cache = window, no_speech, cache
        self.compression_ratio_threshold = compression_ratio_threshold
        self.logprob_threshold, self.no_speech_threshold = logprob_threshold, no_speech_threshold
        self.used: dict[int, float] = {}  # window -> the temperature of the attempt it kept
        self.attempts: dict[int, int] = {}  # window -> attempts decoded

    def restart(self) -> None:
        self.used.clear()
        self.attempts.clear()

    def judge(self, sequence: torch.Tensor, output: dict, temperature: float) -> tuple[bool, bool, float]:
        """(needs another attempt, loops, mean log-probability) of one attempt at a window."""
        text = self.tokenizer.decode([int(t) for t in sequence.tolist() if int(t) < self.eot]).strip()
        scores = output.get("scores") if isinstance(output, dict) else None
        logprob = avg_logprob(scores, _with_eot(sequence, scores, self.eot), temperature) if scores else 0.0
        limit = self.compression_ratio_threshold
        looped = limit is not None and compression_ratio(text) > limit  # once: the verdict and keep="best" read it
        again = _verdict(looped, logprob, self.no_speech(output), self.logprob_threshold, self.no_speech_threshold)
        return again, looped, logprob

    def run(self, attempt: Callable[[float], tuple], temperatures) -> tuple:
        """Decode one window through `attempt(temperature)` (transformers' generate_with_fallback at one
        temperature, for one clip) up the ladder until an attempt passes; the attempt's result kept."""
        tried = []  # (result, temperature, loops, mean log-probability)
        for temperature in temperatures:
            if tried and self.cache is not None:
                self.cache.self_attention_cache.reset()
            result = attempt(float(temperature))
            again, looped, logprob = self.judge(result[0][0], result[1][0], float(temperature))
            tried.append((result, float(temperature), looped, logprob))
            if not again:
                break
        if not again or self.keep == "last":  # the one that passed, or openai's choice
            chosen = tried[-1]
        else:
            chosen = max([t for t in tried if not t[2]] or tried, key=lambda t: t[3])
        window = self.window()
        self.used[window], self.attempts[window] = chosen[1], len(tried)
        return chosen[0]


def _with_eot(sequence: torch.Tensor, scores, eot: int) -> torch.Tensor:
    # generate_with_fallback hands back a window's tokens without the <|endoftext|> its last step chose
    if len(scores) == sequence.shape[-1] + 1:
        return torch.cat([sequence, sequence.new_tensor([eot])])
    return sequence


@contextmanager
def applied(model, rule: Rule | None):
    """While active, this thread's generate calls on `model` run each window's attempts through `rule`
    (other threads keep transformers' own ladder). No rule, or a transformers whose
    generate_with_fallback takes other arguments: as is."""
    if rule is None or not _install(model):
        yield
        return
    _active.rule = rule
    try:
        yield
    finally:
        _active.rule = None


def _install(model) -> bool:
    with _install_lock:
        if getattr(model, "_tarq_fallback", None) is None:
            original = getattr(type(model), "generate_with_fallback", None)
            params = inspect.signature(original).parameters if original is not None else {}
            model._tarq_fallback = all(p in params for p in _NEEDED)
            if model._tarq_fallback:
                # bound to the model (not a closure): a deep copy binds its own
                model.generate_with_fallback = types.MethodType(_generate_with_rule, model)
            else:
                log.warning("transformers' generate_with_fallback takes %s: temperature fallback left to "
                            "transformers", list(params))
        return model._tarq_fallback


def _generate_with_rule(model, *args, **kwargs):
    original = type(model).generate_with_fallback
    rule = getattr(_active, "rule", None)
    given = inspect.signature(original).bind(model, *args, **kwargs).arguments
    if rule is None or given["cur_bsz"] != 1:
        return original(model, *args, **kwargs)
    given.pop("self", None)
    config = given["generation_config"]

    def attempt(temperature: float) -> tuple:
        return original(model, **{**given, "temperatures": [temperature]})

    result = rule.run(attempt, given["temperatures"])
    # as transformers' ladder sets it for the next window: condition on this one's text only if decoded cool
    cool = rule.used[rule.window()] < 0.5
    given["do_condition_on_prev_tokens"][0] = bool(config.condition_on_prev_tokens) and cool
    return result


@contextmanager
def seeded(device, seed: int = 0):
    """Sampling in this block draws from a fixed seed (the fallback at temperature 0 stays deterministic:
    the same audio, the same transcript); the random state outside it is left as it was."""
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield
