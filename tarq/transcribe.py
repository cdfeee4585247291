"""Transcription with a (possibly quantized) Whisper model: one clip with segments and word timings
for the CLI and the service, or many clips with one fixed greedy recipe for evaluation.

Both go through transformers' `generate`, which handles audio longer than 30 s itself (sequential
long-form decoding over 30 s windows, driven by timestamp tokens) when it gets the full,
untruncated features. Compute stays in the model's dtype; on CPU load models in float32
(float16 matmuls are ~3x slower there).
"""

from __future__ import annotations

import logging
import threading
import types
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tarq import fallback
from tarq.config import COMPRESSION_RATIO_THRESHOLD, DTYPES, LOGPROB_THRESHOLD, NO_SPEECH_THRESHOLD
from tarq.errors import AudioError, ModelError
from tarq.formats import LANGUAGES, Segment, Transcript, Word
from tarq.models.whisper import encode, is_multilingual

log = logging.getLogger("tarq.transcribe")
SAMPLE_RATE = 16000  # Whisper's; tarq.audio.load_audio returns audio at this rate
WINDOW_SECONDS = 30.0  # one encoder pass; longer clips need timestamp-driven long-form decoding
FRAMES_PER_SECOND = 100  # mel frames; OpenAI's `seek` is counted in them
TASKS = ("transcribe", "translate")  # Whisper's tasks; translate: into English


# ---------------------------------------------------------------------------------------------
# Loading and caching


def compute_dtype(name: str, device: str) -> torch.dtype:
    """The dtype a model runs in. "auto": float16 on CUDA, bfloat16 on CPUs where a bf16 matmul measures
    faster than float32 (`tarq.qlinear.cpu_bf16_pays`; with AMX whisper-base transcribes ~2x faster,
    bench/speed.py), float32 on other CPUs."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if name != "auto":
        return getattr(torch, name)
    if str(device).startswith("cuda"):
        return torch.float16
    from tarq.qlinear import cpu_bf16_pays

    return torch.bfloat16 if cpu_bf16_pays() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the names --dtype and TARQ_DTYPE take."""
    return str(dtype).removeprefix("torch.")


def load(source: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """(model, processor) for a model folder, a cached short name (whisper-tiny.en), a Hub id or a
    tarq artifact, in eval mode, computing in `dtype` (see compute_dtype; an artifact's int4 layers keep
    their codes and run their kernels, the rest of the model is cast). tarq.models.loader does the
    safety checks (safetensors only, no remote code) and raises ModelError."""
    from tarq.models.loader import load_whisper

    model, processor = load_whisper(source, device=device, dtype=compute_dtype(dtype, device))
    model.eval()
    return model, processor


class ModelCache:
    """Keeps the `max_models` most recently used (model, processor) pairs, keyed by (source, device,
    dtype). A transcription worker serves many requests for a few models; loading costs seconds each
    time."""

    def __init__(self, max_models: int = 2, loader=load):
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self._loader = loader
        self._models: OrderedDict[tuple[str, str, str], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str | Path, device: str = "cpu", dtype: str = "float32",
            prepare=None) -> tuple[Any, Any]:
        """The cached pair, loaded first if need be; `prepare(model)` runs after a load, still under the
        lock, so that no other thread uses the model before it is done."""
        key = (str(source), device, dtype)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            # Load under the lock: two threads asking for the same model must not load it twice.
            log.info("loading model %s on %s (--dtype %s)", source, device, dtype)
            loaded = self._loader(source, device=device, dtype=dtype)
            if prepare is not None:
                prepare(loaded[0])
            self._models[key] = loaded
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return loaded

    def __contains__(self, key: tuple[str, ...]) -> bool:
        """(source, device) or (source, device, dtype); dtype defaults to float32 as in get()."""
        source, device, dtype = (*key, "float32")[:3]
        return (str(source), device, dtype) in self._models

    def __len__(self) -> int:
        return len(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


# ---------------------------------------------------------------------------------------------
# Model facts


def has_timestamps(model, processor) -> bool:
    """Whether the tokenizer covers Whisper's <|0.00|> ... <|30.00|> tokens (some converted models
    lack them) and the generation config knows <|notimestamps|>."""
    tok = processor.tokenizer
    first = tok.convert_tokens_to_ids("<|0.00|>")
    ok = isinstance(first, int) and first != tok.unk_token_id and first < model.config.vocab_size
    return ok and getattr(model.generation_config, "no_timestamps_token_id", None) is not None


def has_alignment_heads(model) -> bool:
    return bool(getattr(model.generation_config, "alignment_heads", None))


def _eot_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")


def _text_tokens(tokens, eot: int) -> list[int]:
    # Every special and timestamp token sits at or above <|endoftext|> in Whisper's vocabularies.
    return [int(t) for t in tokens if int(t) < eot]


def _language_kwargs(model, language: str | None, task: str = "transcribe") -> dict[str, Any]:
    """English-only models refuse language/task arguments (MODELS.md pitfall 9): send them only to
    multilingual models; ask an English-only model for English and it simply works."""
    if is_multilingual(model):
        return {"language": language, "task": task} if language else {"task": task}
    if task != "transcribe":
        raise ModelError("this model is English-only and cannot translate: use a multilingual Whisper")
    if language and language.lower() not in ("en", "english", "<|en|>"):
        raise ModelError(f"this model is English-only; language {language!r} is not available")
    return {}


def _features(processor, audios: list[np.ndarray], model, long_form: bool) -> tuple[torch.Tensor, Any]:
    """Log-mel features (and, for long-form, the attention mask saying where each clip ends)."""
    if long_form:
        # Untruncated features padded to the longest clip: transformers then runs long-form decoding.
        f = processor.feature_extractor(
            audios, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
            padding="longest", return_attention_mask=True,
        )
        mask = f.attention_mask.to(model.device)
    else:
        # Padded to 30 s; the mask (real frames) only sharpens word timings and is harmless otherwise.
        f = processor.feature_extractor(
            audios, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True
        )
        mask = f.attention_mask.to(model.device)
    return f.input_features.to(model.device, model.dtype), mask


def _check_audio(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"expected mono audio (one dimension), got shape {audio.shape}")
    if audio.size == 0:
        raise AudioError("audio is empty")
    return audio


# ---------------------------------------------------------------------------------------------
# One clip, with segments


def transcribe(
    model,
    processor,
    audio: np.ndarray,
    *,
    language: str | None = None,
    prompt: str | None = None,
    temperature: float = 0.0,
    word_timestamps: bool = False,
    share_encoder: bool = True,
    task: str = "transcribe",
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD,
    logprob_threshold: float | None = LOGPROB_THRESHOLD,
    compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
    temperature_increment: float | None = None,
) -> Transcript:
    """Transcribe one 16 kHz mono clip of any length; `task="translate"` translates it into English
    (multilingual models: Whisper's <|translate|> task; the transcript's language is then English).

    Segments come from Whisper's timestamp tokens (one segment for the clip when the tokenizer has
    none); `words` from cross-attention alignment (the model's alignment heads) when asked.
    `language=None` lets a multilingual model detect it. `prompt` conditions the first window like
    OpenAI's `prompt`. temperature 0 is greedy; above 0 samples.

    Temperature fallback, as openai/whisper and OpenAI's API at temperature 0 (tarq.fallback): a window
    whose text compresses by more than `compression_ratio_threshold` (a loop) or whose tokens average a
    log-probability below `logprob_threshold` is decoded again at `temperature` + `temperature_increment`,
    and so on up to 1.0, unless the window is silent (below); None or 0 (the default: measured no better,
    tarq.config.TEMPERATURE_INCREMENT) leaves it off, 0.2 is openai/whisper's. Starting from 0 its sampling
    draws from a fixed seed, so that the same audio gives the same transcript. Each segment's `temperature`
    says which attempt its window kept.

    A window Whisper itself finds silent is left out, as openai/whisper's transcribe() does: no-speech
    probability above `no_speech_threshold` and mean token log-probability below `logprob_threshold`
    (None: the no-speech probability alone decides; `no_speech_threshold=None` keeps every window).

    A clip of up to 30 s is encoded once, and language detection, decoding and the no-speech
    probability all read that encoder output; left to themselves, transformers' language detection and
    the no-speech step would each run the encoder again (three passes for a multilingual model). In
    long-form decoding each window's no-speech step reads the encoder output `generate` made for it, and
    a multilingual model's language is detected from the first window's encoding, which generate then
    takes instead of encoding that window again.
    `share_encoder=False` lets them (the same transcript, slower: `python bench/request.py` compares).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    audio = _check_audio(audio)
    duration = len(audio) / SAMPLE_RATE
    timestamps = has_timestamps(model, processor)
    long_form = duration > WINDOW_SECONDS
    if long_form and not timestamps:
        raise AudioError(
            f"audio is {duration:.1f} s long; beyond {WINDOW_SECONDS:.0f} s this model needs timestamp "
            "tokens, which its tokenizer lacks"
        )
    if word_timestamps and not has_alignment_heads(model):
        raise ModelError(
            "word timestamps need the model's alignment heads; this model's generation config has none"
        )

    features, mask = _features(processor, [audio], model, long_form)
    kwargs: dict[str, Any] = _language_kwargs(model, language, task)  # None: a multilingual model detects it
    if prompt:
        kwargs["prompt_ids"] = processor.get_prompt_ids(prompt, return_tensors="pt").to(model.device)
    ladder = fallback.temperatures(temperature, temperature_increment)
    if len(ladder) > 1:
        kwargs["temperature"] = ladder  # generate decodes a window again at the next one when the rule says so
    elif temperature > 0:
        kwargs["temperature"] = float(temperature)
        kwargs["do_sample"] = True
    if word_timestamps:
        kwargs["return_token_timestamps"] = True

    windows: list[int] = []  # mel-frame offset of each 30 s window, in decoding order

    def note_window(progress: torch.Tensor) -> None:
        windows.append(int(progress[0, 0]))

    def generate(**extra):
        windows.clear()
        seen.clear()
        if rule is not None:
            rule.restart()
        return model.generate(
            features,
            attention_mask=mask,
            return_timestamps=timestamps,
            return_segments=True,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            monitor_progress=note_window,
            **kwargs,
            **extra,
        )

    seen: dict[int, float] = {}  # window -> no-speech probability, read from generate's own first step
    with torch.inference_mode():
        encoded = first = cross = None
        if share_encoder and not long_form:
            encoded = encode(model, features)
            if "language" not in kwargs and is_multilingual(model):
                # generate refuses to detect from encoder outputs when it also has the features: detect here,
                # from one decoder step on <|startoftranscript|>, whose cross-attention keys and values
                # generate then reuses
                first, cross = _first_step(model, encoded)
                kwargs["language"] = _language_token(model, first)
        reused = None
        if share_encoder and long_form and "language" not in kwargs and is_multilingual(model):
            # transformers would detect the language from an encoding of the first window of its own, then
            # encode that window again in its long-form loop: detect from one encoding here and hand it to
            # the loop (which takes no encoder output) through the encoder itself
            window = features[..., : int(WINDOW_SECONDS * FRAMES_PER_SECOND)]
            reused = (window, encode(model, window))
            kwargs["language"] = _language_token(model, _first_step_logits(model, reused[1]))
        hook = None
        if share_encoder and _no_speech_not_in_logits(model, timestamps):
            hook = model.get_decoder().register_forward_hook(_no_speech_recorder(model, windows, seen),
                                                            with_kwargs=True)
        rule = None
        if len(ladder) > 1:
            rule = fallback.Rule(
                processor.tokenizer, _eot_id(processor), window=lambda: max(len(windows) - 1, 0),
                no_speech=_no_speech_now(model, windows, seen, sot_logits=timestamps and not is_multilingual(model)),
                compression_ratio_threshold=compression_ratio_threshold, logprob_threshold=logprob_threshold,
                no_speech_threshold=no_speech_threshold, cache=cross)
        sampling = fallback.seeded(model.device) if rule is not None and temperature == 0 else nullcontext()
        try:
            with fallback.applied(model, rule), sampling:
                if reused is not None:
                    with _reusing_encoding(model, *reused):
                        out = generate()
                elif encoded is None:
                    out = generate()
                elif cross is not None:
                    out = generate(encoder_outputs=encoded, cache=cross)
                else:
                    out = generate(encoder_outputs=encoded)
                if encoded is not None and len(windows) > 1:
                    # The first window ended on a timestamp pair short of 30 s and generate went on to a
                    # second one, which it decoded from the first window's encoder output: decode again, each
                    # window encoding its own frames. (Rare on real speech: bench/request.py counts passes.)
                    encoded = None
                    if rule is not None:
                        rule.cache = None
                    out = generate()
        finally:
            if hook is not None:
                hook.remove()
        raw_segments = out["segments"][0] if isinstance(out, dict) and "segments" in out else None
        if raw_segments is None:  # short-form without timestamps returns a plain output
            raw_segments = _single_segment(out, duration)
        no_speech = _no_speech_probs(model, features, windows or [0], raw_segments, prompt_is_sot=timestamps,
                                     encoded=encoded, first=first, seen=seen)

    eot = _eot_id(processor)
    window_of = _window_of(raw_segments, windows or [0])
    kept = [rule.used.get(w, ladder[0]) if rule is not None else ladder[0] for w in range(len(windows or [0]))]
    # each segment's once: the silent-window rule and its avg_logprob
    logprobs = [_token_logprobs(raw, kept[w]) for raw, w in zip(raw_segments, window_of)]
    segments, words = _build_segments(
        raw_segments, window_of, logprobs, processor, eot, windows or [0], no_speech, kept, duration,
        word_timestamps, silent=_silent_windows(window_of, logprobs, no_speech, no_speech_threshold, logprob_threshold),
    )
    text = "".join(s.text for s in segments).strip()
    if task == "translate":
        language = "en"
    elif language is None:
        language = _detected_language(model, processor, raw_segments) if is_multilingual(model) else "en"
    return Transcript(
        text=text, language=language_code(language), duration=round(duration, 3),
        segments=segments, words=words,
    )


def language_code(language: str) -> str:
    """'en', 'English' or '<|en|>' -> 'en' (OpenAI takes codes; Whisper's tools also take names)."""
    lang = language.strip().lower().strip("<|>")
    by_name = {name: code for code, name in LANGUAGES.items()}
    return by_name.get(lang, lang)


_held = threading.local()  # this thread's (features, encoder output) for the encoder to hand back once
_install_lock = threading.Lock()


@contextmanager
def _reusing_encoding(model, features: torch.Tensor, encoded):
    """While active, the model's encoder called (by generate) on exactly `features` returns `encoded`
    instead of running, once. Per thread: other requests on the same model run as usual."""
    encoder = model.get_encoder()
    with _install_lock:
        if not getattr(encoder, "_tarq_reuses", False):
            _install_reuse(encoder)
    _held.pair = (features, encoded)
    try:
        yield
    finally:
        _held.pair = None


def _install_reuse(encoder) -> None:
    # a method bound to the module (not a closure over its forward): a deep copy of the model binds its
    # own encoder, not this one
    encoder.forward = types.MethodType(_forward_or_held, encoder)
    encoder._tarq_reuses = True


def _forward_or_held(encoder, input_features=None, *args, **kwargs):
    held = getattr(_held, "pair", None)
    plain = not args and not kwargs.get("output_attentions") and not kwargs.get("output_hidden_states") \
        and kwargs.get("return_dict", True) is not False
    if held is not None and plain and input_features is not None and \
            input_features.shape == held[0].shape and torch.equal(input_features, held[0]):
        _held.pair = None
        return held[1]
    return type(encoder).forward(encoder, input_features, *args, **kwargs)


def _first_step_logits(model, encoded) -> torch.Tensor:
    """Raw logits [clips, vocab] of the one decoder step on <|startoftranscript|>: what transformers'
    language detection reads, and Whisper's no-speech probability."""
    return _first_step(model, encoded, keep_cross=False)[0]


def _first_step(model, encoded, keep_cross: bool = True):
    """The first-step logits and, with `keep_cross`, a cache holding the decoder's cross-attention keys
    and values of `encoded` (every layer projects all 1500 frames: ~11% of the encoder's FLOPs) and an
    empty self-attention part, for `generate(cache=...)` to decode on without computing them again.
    None where the generation config asks for a cache of its own kind (a static cache for compiling)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    gc = model.generation_config
    start = torch.full((encoded.last_hidden_state.shape[0], 1), gc.decoder_start_token_id, dtype=torch.long,
                       device=encoded.last_hidden_state.device)
    if not keep_cross or getattr(gc, "cache_implementation", None) is not None:
        return model(encoder_outputs=encoded, decoder_input_ids=start, use_cache=False).logits[:, 0], None
    config = model.config.get_text_config(decoder=True)  # what generate sizes its own caches by
    cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    logits = model(encoder_outputs=encoded, decoder_input_ids=start, cache=cache, use_cache=True).logits[:, 0]
    # a fresh self-attention part: generate decodes its whole prompt, <|startoftranscript|> included
    return logits, EncoderDecoderCache(DynamicCache(config=config), cache.cross_attention_cache)


def _language_token(model, first: torch.Tensor) -> str:
    """The language token (e.g. "<|en|>") transformers' `detect_language` picks for the first clip: the
    most likely language token after <|startoftranscript|>."""
    lang_to_id = model.generation_config.lang_to_id
    tokens, ids = list(lang_to_id), list(lang_to_id.values())
    return tokens[int(first[0, ids].argmax())]


def _detected_language(model, processor, raw_segments: list[dict]) -> str:
    """The language token generate chose: it sits in the decoder prompt of the first window's output."""
    lang_ids = set((getattr(model.generation_config, "lang_to_id", None) or {}).values())
    for raw in raw_segments[:1]:
        result = raw.get("result")
        seq = result.get("sequences") if isinstance(result, dict) else None
        if seq is not None:
            for token in seq.reshape(-1).tolist():
                if token in lang_ids:
                    return processor.tokenizer.convert_ids_to_tokens(int(token)).strip("<|>")
    return "unknown"


def _single_segment(out, duration: float) -> list[dict]:
    sequences = out["sequences"] if isinstance(out, dict) or hasattr(out, "sequences") else out
    tokens = sequences[0]
    return [{"start": 0.0, "end": duration, "tokens": tokens, "idxs": (0, len(tokens)), "result": out}]


def _no_speech_id(model) -> int | None:
    """<|nospeech|> (<|nocaptions|> in English-only vocabularies): the token before <|notimestamps|>, the
    same rule transformers uses; None without timestamp tokens."""
    no_ts = getattr(model.generation_config, "no_timestamps_token_id", None)
    return None if no_ts is None else no_ts - 1


def _p_no_speech(logits: torch.Tensor, no_speech_id: int) -> list[float]:
    """P(<|nospeech|>) per row of raw logits [rows, vocab], softmax in float32."""
    return logits.float().softmax(dim=-1)[:, no_speech_id].tolist()


def _p_no_speech_first_step(result: dict, no_speech_id: int) -> float | None:
    """P(<|nospeech|>) read off a window's first generated step (its raw logits, in generate's per-window
    result), where the prompt is <|startoftranscript|> alone; None without logits."""
    logits = result.get("logits") if isinstance(result, dict) else None
    if not logits:
        return None
    return _p_no_speech(logits[0].reshape(-1, logits[0].shape[-1])[:1], no_speech_id)[0]


def _no_speech_not_in_logits(model, prompt_is_sot: bool) -> bool:
    """Whether the no-speech probability is missing from the logits generate returns (see
    `_no_speech_probs`): read from generate's first step by `_no_speech_recorder`, or else a step of its own."""
    return _no_speech_id(model) is not None and not (prompt_is_sot and not is_multilingual(model))


def _no_speech_recorder(model, windows: list[int], seen: dict[int, float]):
    """A forward hook (with kwargs) for the decoder: each window's first decoder call in `generate` runs
    on the whole prompt, <|startoftranscript|> included, and its hidden state there is what the no-speech
    probability reads (causal attention: it depends on the tokens up to it alone, as in OpenAI's
    `DecodingTask`, a prompt before it included). Projecting that one row costs one row of the output
    layer instead of a decoder step and, per window, the cross-attention keys and values again. Calls
    before the first window (language detection), decoding steps (no <|startoftranscript|>) and calls
    from other threads are not recorded."""
    caller, no_speech_id = threading.get_ident(), _no_speech_id(model)
    start = model.generation_config.decoder_start_token_id

    def record(_module, _args, kwargs, output) -> None:
        ids = kwargs.get("input_ids")
        if not windows or ids is None or threading.get_ident() != caller:
            return
        at = (ids[0] == start).nonzero()
        if len(at):
            hidden = output[0][:1, int(at[-1])]
            seen[len(windows) - 1] = _p_no_speech(model.proj_out(hidden), no_speech_id)[0]

    return record


def _no_speech_now(model, windows: list[int], seen: dict[int, float], sot_logits: bool):
    """For the fallback rule: the no-speech probability of the window generate is decoding, given an
    attempt's output, from what `_no_speech_probs` reads later (`seen`, or with `sot_logits` the attempt's
    first raw logits); None where only a step of its own could tell."""
    no_speech_id = _no_speech_id(model)

    def now(output: dict) -> float | None:
        window = max(len(windows) - 1, 0)
        if window in seen:
            return seen[window]
        if no_speech_id is None or not sot_logits:
            return None
        return _p_no_speech_first_step(output, no_speech_id)

    return now


def _no_speech_probs(
    model, features: torch.Tensor, windows: list[int], raw_segments: list[dict], prompt_is_sot: bool,
    encoded=None, first: torch.Tensor | None = None, seen: dict[int, float] | None = None,
) -> list[float]:
    """Whisper's no_speech_prob per window: the probability of <|nospeech|> (<|nocaptions|> in
    English-only vocabularies) predicted right after <|startoftranscript|>, from raw logits (the
    filtered scores suppress that token).

    English-only models decoding with timestamps start each window right after
    <|startoftranscript|>, so the raw logits of the first generated step are exactly that
    prediction and cost nothing. Otherwise (language and task tokens follow it): `seen`, which
    `_no_speech_recorder` read off generate's first decoder call of each window; without it, one decoder
    step per window: `first` when language detection already ran it, else a step on `encoded` (a short
    clip's encoder output), else each window's encoder runs again (share_encoder=False). Causal attention
    makes that position depend on the tokens up to <|startoftranscript|> alone.
    """
    gc = model.generation_config
    no_speech_id = _no_speech_id(model)
    if no_speech_id is None:
        return [0.0] * len(windows)

    if prompt_is_sot and not is_multilingual(model):
        # Segments of one window share its result; dicts keep the windows' order.
        by_window = {id(r["result"]): r["result"] for r in raw_segments if isinstance(r.get("result"), dict)}
        probs = [_p_no_speech_first_step(r, no_speech_id) for r in by_window.values()]
        probs = [p for p in probs if p is not None]
        if len(probs) == len(windows):
            return probs

    if seen and all(i in seen for i in range(len(windows))):
        return [seen[i] for i in range(len(windows))]
    if encoded is not None and windows == [0]:
        return _p_no_speech(first if first is not None else _first_step_logits(model, encoded), no_speech_id)
    start = torch.full((len(windows), 1), gc.decoder_start_token_id, dtype=torch.long, device=features.device)
    n = int(WINDOW_SECONDS * FRAMES_PER_SECOND)
    chunks = []
    for seek in windows:
        chunk = features[:, :, seek : seek + n]
        if chunk.shape[-1] < n:
            chunk = torch.nn.functional.pad(chunk, (0, n - chunk.shape[-1]))
        chunks.append(chunk)
    batch = torch.cat(chunks, dim=0)
    return _p_no_speech(model(input_features=batch, decoder_input_ids=start).logits[:, 0], no_speech_id)


def _mean(total: float, count: int) -> float:
    return total / count if count else 0.0


def _token_logprobs(seg: dict, temperature: float = 0.0) -> tuple[float, int]:
    """(sum, count) of the log-probabilities of the segment's tokens under the (filtered) scores generate
    used, at temperature 1 (sampling divided the scores by `temperature`); their mean is openai/whisper's
    avg_logprob."""
    result = seg.get("result")
    if not isinstance(result, dict) or result.get("scores") is None or result.get("sequences") is None:
        return 0.0, 0
    scores = result["scores"]
    seq = result["sequences"]
    seq = seq[0] if seq.dim() > 1 else seq
    offset = seq.shape[-1] - len(scores)  # the decoder prompt precedes the generated tokens
    lo, hi = seg["idxs"]
    positions = [pos for pos in range(lo, min(hi, seq.shape[-1])) if 0 <= pos - offset < len(scores)]
    if not positions:
        return 0.0, 0
    logp = fallback.token_logprobs([scores[pos - offset] for pos in positions], seq[positions], temperature)
    logp = logp[torch.isfinite(logp)].double()
    return float(logp.sum()), int(logp.numel())


def _window_of(raw_segments: list[dict], windows: list[int]) -> list[int]:
    """The window each raw segment was decoded in: segments of one window share generate's result object,
    and windows are decoded in order."""
    first: dict[int, int] = {}
    return [min(first.setdefault(id(raw.get("result")), len(first)), len(windows) - 1) for raw in raw_segments]


def _silent_windows(window_of: list[int], logprobs: list[tuple[float, int]], no_speech: list[float],
                    no_speech_threshold: float | None, logprob_threshold: float | None) -> set[int]:
    """Windows openai/whisper's rule calls silent: P(no speech) > no_speech_threshold, unless the window's
    tokens average a log-probability above logprob_threshold. `window_of` and `logprobs`: each raw
    segment's window and (sum, count) of its tokens' log-probabilities."""
    if no_speech_threshold is None:
        return set()
    sums: dict[int, list[float]] = {}
    for w, (total, count) in zip(window_of, logprobs):
        acc = sums.setdefault(w, [0.0, 0])
        acc[0] += total
        acc[1] += count
    return {w for w, (total, count) in sums.items() if no_speech[w] > no_speech_threshold
            and (logprob_threshold is None or _mean(total, count) < logprob_threshold)}


def _build_segments(
    raw_segments: list[dict], window_of: list[int], logprobs: list[tuple[float, int]], processor, eot: int,
    windows: list[int], no_speech: list[float], temperatures: list[float], duration: float, word_timestamps: bool,
    silent: set[int] = frozenset(),
) -> tuple[list[Segment], list[Word]]:
    tok = processor.tokenizer
    segments: list[Segment] = []
    words: list[Word] = []
    for w, raw, logprob in zip(window_of, raw_segments, logprobs):
        if w in silent:
            continue
        ids = [int(t) for t in raw["tokens"]]
        text_ids = _text_tokens(ids, eot)
        if not text_ids:
            continue
        text = tok.decode(text_ids)
        if float(raw["start"]) >= duration:  # decoded from the padding after the clip's end
            continue
        start = float(raw["start"])
        end = min(max(float(raw["end"]), start), duration)
        segments.append(
            Segment(
                id=len(segments), seek=windows[w], start=round(start, 3), end=round(end, 3), text=text,
                tokens=ids, temperature=float(temperatures[w]), avg_logprob=_mean(*logprob),
                compression_ratio=fallback.compression_ratio(text), no_speech_prob=float(no_speech[w]),
            )
        )
        if word_timestamps and "token_timestamps" in raw:
            words.extend(_words(ids, raw["token_timestamps"], tok, eot, duration))
    return segments, words


def _words(ids: list[int], times, tok, eot: int, duration: float) -> list[Word]:
    """Group BPE pieces into words (a piece starting with a space opens a word) and time each word
    from its first piece's start to the start of the token after its last piece (often the closing
    timestamp). token_timestamps[i] is where token i begins, from dynamic time warping over the
    alignment heads' cross-attention."""
    times = [float(t) for t in times]
    groups: list[list[int]] = []  # positions in `ids` of each word's pieces
    for pos, token in enumerate(ids):
        if token >= eot or pos >= len(times):
            continue
        if not groups or tok.decode([token]).startswith(" "):
            groups.append([pos])
        else:
            groups[-1].append(pos)
    out: list[Word] = []
    for group in groups:
        word = tok.decode([ids[p] for p in group]).strip()
        if not word:
            continue
        start = min(times[group[0]], duration)
        after = group[-1] + 1
        end = min(times[after] if after < len(times) else duration, duration)
        out.append(Word(word=word, start=round(start, 3), end=round(max(end, start), 3)))
    return out


# ---------------------------------------------------------------------------------------------
# Many clips, one recipe (evaluation)


def transcribe_batch(
    model, processor, audios: list[np.ndarray], *, language: str = "en", batch_size: int = 8
) -> list[str]:
    """Texts for many clips with one recipe for every model: greedy, no prompt, no timestamps for
    clips up to 30 s (batched); longer clips go one at a time through long-form decoding (it needs
    timestamps, and batching it would change results with the batch's make-up)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    audios = [_check_audio(a) for a in audios]
    eot = _eot_id(processor)
    kwargs = _language_kwargs(model, language)
    texts: list[str | None] = [None] * len(audios)
    short = [i for i, a in enumerate(audios) if len(a) / SAMPLE_RATE <= WINDOW_SECONDS]
    long = [i for i, a in enumerate(audios) if len(a) / SAMPLE_RATE > WINDOW_SECONDS]
    with torch.inference_mode():
        for lo in range(0, len(short), batch_size):
            idx = short[lo : lo + batch_size]
            features, _ = _features(processor, [audios[i] for i in idx], model, long_form=False)
            sequences = model.generate(
                features, encoder_outputs=encode(model, features), return_timestamps=False, do_sample=False,
                num_beams=1, **kwargs,
            )
            for i, seq in zip(idx, sequences):
                texts[i] = processor.tokenizer.decode(_text_tokens(seq.tolist(), eot)).strip()
        for i in long:
            if not has_timestamps(model, processor):
                raise AudioError(
                    f"clip {i} is longer than {WINDOW_SECONDS:.0f} s and this model has no timestamp tokens"
                )
            features, mask = _features(processor, [audios[i]], model, long_form=True)
            sequences = model.generate(
                features, attention_mask=mask, return_timestamps=True, do_sample=False, num_beams=1, **kwargs
            )
            texts[i] = processor.tokenizer.decode(_text_tokens(sequences[0].tolist(), eot)).strip()
    return [t or "" for t in texts]
