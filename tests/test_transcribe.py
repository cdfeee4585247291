import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tarq.errors import AudioError, ModelError
from tarq.formats import FORMATS, Transcript, render
from tarq.models.whisper import encode
from tarq.transcribe import (
    ModelCache,
    _features,
    _first_step,
    _first_step_logits,
    _no_speech_id,
    has_alignment_heads,
    has_timestamps,
    load,
    transcribe,
    transcribe_batch,
)

SR = 16000


@pytest.fixture(scope="module")
def tiny(short_whisper_dir):
    return load(short_whisper_dir)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def test_model_facts(tiny):
    model, processor = tiny
    assert has_timestamps(model, processor)
    assert has_alignment_heads(model)


def test_transcribe_renders_every_format(tiny):
    from openai.types.audio import TranscriptionVerbose

    model, processor = tiny
    t = transcribe(model, processor, noise(4.0), word_timestamps=True)
    assert isinstance(t, Transcript)
    assert t.language == "en" and t.duration == 4.0
    assert t.text == "".join(s.text for s in t.segments).strip()
    for s in t.segments:
        assert 0.0 <= s.start <= s.end <= t.duration
        assert s.seek == 0 and s.temperature == 0.0 and 0.0 <= s.no_speech_prob <= 1.0
        assert s.tokens and s.avg_logprob <= 0.0
    for w in t.words:
        assert 0.0 <= w.start <= w.end <= t.duration and w.word == w.word.strip()
    for fmt in FORMATS:
        body, media = render(t, fmt, granularities=("segment", "word"))
        assert body is not None and media
    verbose = render(t, "verbose_json", granularities=("segment", "word"))[0]
    assert TranscriptionVerbose.model_validate(verbose).duration == 4.0
    assert Transcript.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_greedy_is_deterministic_and_prompt_is_accepted(tiny):
    model, processor = tiny
    a = noise(3.0, seed=1)
    assert transcribe(model, processor, a) == transcribe(model, processor, a)
    prompted = transcribe(model, processor, a, prompt="Quilter, Newgate")
    assert isinstance(prompted, Transcript)  # random weights: the text itself means nothing


def test_sampling_temperature(tiny):
    model, processor = tiny
    t = transcribe(model, processor, noise(2.0), temperature=0.7)
    assert all(s.temperature == 0.7 for s in t.segments)


def test_windows_whisper_finds_silent_are_left_out(tiny):
    """openai/whisper's rule: P(no speech) above the threshold and a mean log-probability below its own
    leave the window out, its words too. Random weights: the thresholds pick the outcome."""
    model, processor = tiny
    audio = np.concatenate([noise(15.0, seed=s) for s in range(3)])  # 45 s: two windows or more
    kept = transcribe(model, processor, audio, word_timestamps=True, no_speech_threshold=None)
    assert kept.segments and kept.words and len({s.seek for s in kept.segments}) > 1
    probs = sorted({s.no_speech_prob for s in kept.segments})
    assert transcribe(model, processor, audio, word_timestamps=True) == kept  # no window is near 0.6 here
    gone = transcribe(model, processor, audio, word_timestamps=True, no_speech_threshold=0.0, logprob_threshold=None)
    assert (gone.text, gone.segments, gone.words) == ("", [], [])
    assert gone.duration == kept.duration
    # a logprob threshold below every window's mean keeps them all, whatever their no-speech probability
    assert transcribe(model, processor, audio, word_timestamps=True, no_speech_threshold=0.0,
                      logprob_threshold=-1e9) == kept
    # between two windows' no-speech probabilities: the quieter-looking one goes, the other stays
    assert len(probs) > 1
    cut = (probs[0] + probs[-1]) / 2
    some = transcribe(model, processor, audio, no_speech_threshold=cut, logprob_threshold=None)
    assert some.segments and all(s.no_speech_prob <= cut for s in some.segments)
    assert len(some.segments) < len(kept.segments)


def test_language_code():
    from tarq.transcribe import language_code

    assert language_code("English") == language_code("<|en|>") == language_code("en") == "en"
    assert language_code("haitian creole") == "ht"


def test_long_audio_uses_long_form(tiny):
    model, processor = tiny
    audio = np.concatenate([noise(15.0, seed=s) for s in range(3)])  # 45 s
    t = transcribe(model, processor, audio)
    assert t.duration == 45.0
    assert all(0.0 <= s.start <= s.end <= 45.0 for s in t.segments)
    assert all(s.seek % 1 == 0 and 0 <= s.seek < 4500 for s in t.segments)
    [text] = transcribe_batch(model, processor, [audio])
    assert isinstance(text, str)


def test_batch_equals_one_by_one(tiny):
    model, processor = tiny
    audios = [noise(d, seed=i) for i, d in enumerate((1.0, 2.5, 4.0, 0.5, 3.0))]
    batched = transcribe_batch(model, processor, audios, batch_size=3)
    single = [transcribe_batch(model, processor, [a], batch_size=1)[0] for a in audios]
    assert batched == single
    assert len(batched) == 5


def test_batch_encoder_runs_in_chunks_on_cpu(tiny, monkeypatch):
    from tarq.models import whisper
    from tarq.transcribe import _features

    model, processor = tiny
    audios = [noise(d, seed=i) for i, d in enumerate((1.0, 2.5, 4.0))]
    features, _ = _features(processor, audios, model, long_form=False)
    whole = whisper.encode(model, features).last_hidden_state
    texts = transcribe_batch(model, processor, audios, batch_size=3)
    calls = []
    encoder = model.get_encoder()
    handle = encoder.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    monkeypatch.setattr(whisper, "HEAP_ALLOC_MAX", 1)
    try:
        chunked = whisper.encode(model, features).last_hidden_state
        assert transcribe_batch(model, processor, audios, batch_size=3) == texts
    finally:
        handle.remove()
    assert calls == [1, 1, 1] * 2  # one clip per call, and generate did not run the encoder again
    torch.testing.assert_close(chunked, whole)


def multilingual_copy(folder: Path, out: Path, timestamps: bool = True, device: str = "cpu", dtype: str = "float32"):
    """The tiny random Whisper with a multilingual generation config (two languages of the fixture's
    vocabulary: no language given, generate detects one); without timestamps on request."""
    import shutil

    from tests.conftest import make_multilingual

    shutil.copytree(folder, out)
    return load(make_multilingual(out, timestamps), device=device, dtype=dtype)


def encoder_passes(model, processor, audio, **kw) -> dict:
    """{share_encoder: (transcript, 30 s windows through the encoder, windows whose cross-attention keys
    the decoder computed)} for both settings."""
    passes, cross = [], []
    handles = [
        # the encoder's first layer: it runs on every window the encoder computes (an encoding handed back
        # to generate does not call it)
        model.get_encoder().conv1.register_forward_hook(lambda _m, args, _o: passes.extend([1] * len(args[0]))),
        cross_key_projection(model).register_forward_hook(lambda _m, args, _o: cross.extend([1] * len(args[0]))),
    ]
    try:
        got = {}
        for share in (False, True):
            passes.clear()
            cross.clear()
            got[share] = (transcribe(model, processor, audio, share_encoder=share, **kw), len(passes), len(cross))
        return got
    finally:
        for h in handles:
            h.remove()


def cross_key_projection(model):
    """The first decoder layer's cross-attention key projection: it runs once per encoder output the
    decoder attends to afresh."""
    return model.get_decoder().layers[0].encoder_attn.k_proj


def test_first_step_hands_its_cross_attention_to_generate(short_whisper_dir, tmp_path):
    """The no-speech / language step's cache carries the cross-attention keys and values into generate,
    which then computes none and decodes the same tokens as on its own."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    features, mask = _features(processor, [noise(4.0)], model, long_form=False)
    calls = []
    handle = cross_key_projection(model).register_forward_hook(lambda *_: calls.append(1))
    args = {"attention_mask": mask, "language": "en", "task": "transcribe", "return_timestamps": False,
            "max_new_tokens": 8}
    try:
        with torch.inference_mode():
            encoded = encode(model, features)
            first, cache = _first_step(model, encoded)
            shared = model.generate(features, encoder_outputs=encoded, cache=cache, **args)
            assert len(calls) == 1
            calls.clear()
            alone = model.generate(features, encoder_outputs=encoded, **args)
            assert len(calls) == 1
            torch.testing.assert_close(first, _first_step_logits(model, encoded))
    finally:
        handle.remove()
    assert shared.tolist() == alone.tolist()


def test_a_distilled_shape_shares_the_cross_attention_too(make_tiny_whisper, tmp_path):
    """distil-whisper's shape, many encoder layers and few decoder layers: the step's cache holds one
    cross-attention entry per decoder layer and generate decodes on it to the same transcript."""
    folder = make_tiny_whisper(tmp_path / "distil", encoder_layers=3, decoder_layers=1)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "max_length": 16}))
    model, processor = multilingual_copy(folder, tmp_path / "m", timestamps=False)
    got = encoder_passes(model, processor, noise(3.0))
    assert (got[False][1:], got[True][1:]) == ((2, 2), (1, 1))
    assert got[True][0] == got[False][0]
    with torch.inference_mode():
        features, _ = _features(processor, [noise(3.0)], model, long_form=False)
        cache = _first_step(model, encode(model, features))[1]
    assert len(cache.cross_attention_cache.layers) == 1


def test_a_static_cache_config_gets_no_dynamic_cache(short_whisper_dir, tmp_path):
    """A model set up for compiled decoding (a static cache) keeps generate's own cache."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    features, _ = _features(processor, [noise(2.0)], model, long_form=False)
    model.generation_config.cache_implementation = "static"
    with torch.inference_mode():
        assert _first_step(model, encode(model, features))[1] is None


def assert_same_transcript(a: Transcript, b: Transcript, rel: float = 1e-4) -> None:
    """Equal but for the no-speech probabilities, which agree to rounding (`rel`; float32 by default):
    computed one window at a time with a shared encoder, all windows in one batch without."""
    assert [s.no_speech_prob for s in a.segments] == pytest.approx([s.no_speech_prob for s in b.segments], rel=rel)
    def strip(t: Transcript) -> Transcript:
        return dataclasses.replace(t, segments=[dataclasses.replace(s, no_speech_prob=0.0) for s in t.segments])

    assert strip(a) == strip(b)


def test_a_short_clip_is_encoded_once(short_whisper_dir, tmp_path):
    """Language detection and decoding share one encoder pass and give the same transcript as
    transformers' two (this model has no timestamps, hence no no-speech step); generate reuses the
    detection step's cross-attention keys and values."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m", timestamps=False)
    got = encoder_passes(model, processor, noise(4.0))
    assert (got[False][1], got[True][1]) == (2, 1)
    assert (got[False][2], got[True][2]) == (2, 1)  # and the decoder's cross-attention keys once
    assert got[True][0] == got[False][0] and got[True][0].language in ("en", "de")


def test_a_second_window_is_decoded_from_its_own_frames(short_whisper_dir, tmp_path):
    """The random model's first window ends on a timestamp pair, so generate decodes a second window
    (from frame 2994): the shared encoder output of the first must not stand in for it. Separate: the
    language detection, two windows, the no-speech step for both; shared: the clip, two windows (their
    no-speech steps read generate's encoding)."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    got = encoder_passes(model, processor, noise(4.0), word_timestamps=True)
    assert_same_transcript(got[True][0], got[False][0])
    assert got[True][0].words
    assert (got[False][1], got[True][1]) == (5, 3)


def test_long_form_windows_are_encoded_once(short_whisper_dir, tmp_path):
    """Long-form: the language is detected from the first window's encoding, which generate's loop then
    takes instead of encoding that window again; each window's no-speech step reads the encoder output
    generate made for it."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    got = encoder_passes(model, processor, noise(45.0))
    assert_same_transcript(got[True][0], got[False][0])
    windows = len({s.seek for s in got[True][0].segments})
    assert windows >= 2
    # separate: transformers' detection, then each window for generate and for its no-speech step
    assert (got[False][1], got[True][1]) == (1 + 2 * windows, windows)
    # cross-attention keys: the detection step's, then one per window (no-speech needs no step of its own)
    assert (got[False][2], got[True][2]) == (1 + 2 * windows, 1 + windows)


def test_long_form_with_a_language_encodes_each_window_once(short_whisper_dir, tmp_path):
    """Nothing to detect: every window is encoded by generate alone, and the encoder hands nothing back."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    got = encoder_passes(model, processor, noise(45.0), language="de")
    windows = len({s.seek for s in got[True][0].segments})
    assert got[True][1] == windows and got[True][0].language == "de"


def test_a_held_encoding_is_handed_back_once_and_only_for_its_features(short_whisper_dir, tmp_path):
    from tarq.transcribe import _reusing_encoding

    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    features, _ = _features(processor, [noise(3.0)], model, long_form=False)
    other, _ = _features(processor, [noise(3.0, seed=1)], model, long_form=False)
    encoder = model.get_encoder()
    with torch.inference_mode():
        held = encode(model, features)
        with _reusing_encoding(model, features, held):
            assert encoder(other).last_hidden_state is not held.last_hidden_state  # other features: computed
            assert encoder(features.clone()) is held  # equal features: handed back
            again = encoder(features)  # once only
        assert again is not held and torch.allclose(again.last_hidden_state, held.last_hidden_state, atol=1e-5)
        assert encoder(features) is not held  # nothing held outside the block
        # a deep copy of the model runs its own encoder (a bench quantizes such a copy)
        twin = copy.deepcopy(model)
        for p in twin.get_encoder().parameters():
            p.data.zero_()
        assert twin.get_encoder()._tarq_reuses
        assert not torch.equal(twin.get_encoder()(features).last_hidden_state, encoder(features).last_hidden_state)


def test_no_speech_is_read_at_start_of_transcript_after_a_prompt(short_whisper_dir, tmp_path):
    """With a prompt before <|startoftranscript|>, the no-speech probability is the prediction at that
    token given the prompt, as OpenAI's whisper reads it."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    audio = noise(4.0)
    out = transcribe(model, processor, audio, language="en", prompt="Tarq and Whisper")
    prompt = processor.get_prompt_ids("Tarq and Whisper", return_tensors="pt").tolist()
    start = model.generation_config.decoder_start_token_id
    features, _ = _features(processor, [audio], model, long_form=False)
    with torch.inference_mode():
        encoded = encode(model, features)
        ids = torch.tensor([[*prompt, start]])
        logits = model(encoder_outputs=encoded, decoder_input_ids=ids).logits[0, -1]
        unprompted = _first_step_logits(model, encoded)[0]
    want = logits.float().softmax(-1)[_no_speech_id(model)].item()
    assert out.segments[0].no_speech_prob == pytest.approx(want, rel=1e-4)
    assert unprompted.float().softmax(-1)[_no_speech_id(model)].item() != pytest.approx(want, rel=1e-3)


def test_concurrent_requests_keep_their_own_no_speech(short_whisper_dir, tmp_path):
    """Requests in threads on one model (a thread-pool worker): each hook records its own request's
    decoder calls only, so every transcript equals the same request made alone."""
    from concurrent.futures import ThreadPoolExecutor

    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    audios = [noise(2.0 + i, seed=i) for i in range(4)]
    alone = [transcribe(model, processor, a, language="en") for a in audios]
    assert len({t.segments[0].no_speech_prob for t in alone}) == len(audios)
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda a: transcribe(model, processor, a, language="en"), audios * 2))
    for got, want in zip(together, alone * 2):
        assert_same_transcript(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float16_request_shares_the_encoder(short_whisper_dir, tmp_path):
    """The shared path on the service's GPU setting (float16): one encoder pass and one cross-attention
    projection per window fewer, the same transcript (no-speech to float16 rounding)."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m", device="cuda", dtype="float16")
    got = encoder_passes(model, processor, noise(4.0))
    assert_same_transcript(got[True][0], got[False][0], rel=2e-2)
    assert got[True][1] < got[False][1] and got[True][2] < got[False][2]


def test_english_only_model_refuses_other_languages(tiny):
    model, processor = tiny
    assert transcribe(model, processor, noise(1.0), language="en").language == "en"
    with pytest.raises(ModelError, match="English-only.*'fr'"):
        transcribe(model, processor, noise(1.0), language="fr")


@pytest.mark.parametrize("share_encoder", [True, False])
def test_translate_asks_the_decoder_for_the_translate_task(short_whisper_dir, tmp_path, share_encoder):
    """The task token the decoder reads is <|translate|> (50357) for task="translate" and <|transcribe|>
    (50358) otherwise, with the language detected or given; a translation's language is English."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    read: list[int] = []

    def record(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            read.extend(ids.flatten().tolist())

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        for task, language, token, other in [("translate", None, 50357, 50358), ("translate", "de", 50357, 50358),
                                              ("transcribe", "de", 50358, 50357)]:
            read.clear()
            out = transcribe(model, processor, noise(2.0), task=task, language=language, share_encoder=share_encoder)
            assert token in read and other not in read, (task, language)
            assert out.language == ("en" if task == "translate" else "de")
    finally:
        handle.remove()


def test_translate_needs_a_multilingual_model(tiny):
    model, processor = tiny
    with pytest.raises(ModelError, match="English-only and cannot translate"):
        transcribe(model, processor, noise(1.0), task="translate")
    with pytest.raises(ValueError, match="task must be one of transcribe, translate"):
        transcribe(model, processor, noise(1.0), task="summarize")


def test_word_timestamps_need_alignment_heads(tiny):
    model, processor = tiny
    heads = model.generation_config.alignment_heads
    model.generation_config.alignment_heads = None
    try:
        with pytest.raises(ModelError, match="alignment heads"):
            transcribe(model, processor, noise(1.0), word_timestamps=True)
    finally:
        model.generation_config.alignment_heads = heads


def test_bad_audio(tiny):
    model, processor = tiny
    with pytest.raises(AudioError, match="empty"):
        transcribe(model, processor, np.zeros(0, dtype=np.float32))
    with pytest.raises(AudioError, match="mono"):
        transcribe_batch(model, processor, [np.zeros((2, 100), dtype=np.float32)])


def test_compute_dtype():

    from tarq.qlinear import cpu_bf16_pays
    from tarq.transcribe import compute_dtype

    assert compute_dtype("float32", "cpu") is torch.float32 and compute_dtype("bfloat16", "cuda") is torch.bfloat16
    assert compute_dtype("auto", "cuda:1") is torch.float16
    assert compute_dtype("auto", "cpu") is (torch.bfloat16 if cpu_bf16_pays() else torch.float32)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, auto, not 'int8'"):
        compute_dtype("int8", "cpu")
    # the CLI offers exactly the dtypes compute_dtype takes
    from tarq.cli_transcribe import eval_command
    from tarq.cli_transcribe import transcribe as transcribe_command
    from tarq.config import DTYPES

    for command, default in ((transcribe_command, "auto"), (eval_command, "float32")):
        option = next(p for p in command.params if p.name == "dtype")
        assert tuple(option.type.choices) == DTYPES
        # transcription takes what is fast here; scores stay comparable across hosts
        assert option.default == default


def test_bf16_model_transcribes(short_whisper_dir, tiny):
    """A bf16 load computes in bf16 throughout and still decodes (random weights have no text worth
    comparing, so: dtypes, and well-formed results from both entry points)."""

    model, processor = load(short_whisper_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    t = transcribe(model, processor, noise(3.0, seed=2))
    assert isinstance(t, Transcript) and t.duration == 3.0 and all(s.avg_logprob <= 0.0 for s in t.segments)
    texts = transcribe_batch(model, processor, [noise(2.0), noise(3.0, seed=1)], batch_size=2)
    assert len(texts) == 2 and all(isinstance(x, str) for x in texts)
    assert next(tiny[0].parameters()).dtype == torch.float32  # float32 stays the default


def test_load_refuses_non_model(tmp_path):
    with pytest.raises(ModelError):
        load(tmp_path)


def test_model_cache_is_lru():
    calls = []

    def loader(source, device="cpu", dtype="float32"):
        calls.append((source, device, dtype))
        return object(), object()

    cache = ModelCache(max_models=2, loader=loader)
    a = cache.get("a")
    assert cache.get("a") is a and calls == [("a", "cpu", "float32")]
    cache.get("b")
    cache.get("a")  # a is now the most recent
    cache.get("c")  # evicts b
    assert ("a", "cpu") in cache and ("b", "cpu") not in cache and len(cache) == 2
    cache.get("a", "cuda")  # the device is part of the key
    assert calls[-1] == ("a", "cuda", "float32")
    cache.get("a", "cuda", "float16")  # and so is the dtype
    assert calls[-1] == ("a", "cuda", "float16") and ("a", "cuda", "float16") in cache
    with pytest.raises(ValueError):
        ModelCache(max_models=0)


def test_model_cache_prepares_a_load_before_anyone_uses_it():
    """`prepare` (a worker's preload warm-up) runs once, right after the load and under the cache's lock:
    another thread asking for the model meanwhile gets it only when prepare is done."""
    import threading

    prepared, release, got = [], threading.Event(), []

    def prepare(model):
        prepared.append(model)
        release.wait(10)

    cache = ModelCache(loader=lambda source, device="cpu", dtype="float32": (f"model {source}", "processor"))
    first = threading.Thread(target=cache.get, args=("a",), kwargs={"prepare": prepare})
    first.start()
    while not prepared:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: got.append(cache.get("a")))
    second.start()
    second.join(0.3)
    assert got == []  # still waiting for prepare
    release.set()
    first.join()
    second.join()
    assert got == [("model a", "processor")] and prepared == ["model a"]
    cache.get("a", prepare=prepare)  # cached: nothing to prepare
    assert prepared == ["model a"]


# --- real weights ---------------------------------------------------------------------------------

LJ = Path(__file__).resolve().parents[1].parent / "shared/data/speech/ljspeech-385"


@pytest.mark.slow
def test_real_transcription(tiny_en):
    from tarq.audio import load_audio
    from tarq.metrics import score

    model, processor = tiny_en
    audio = load_audio(LJ / "LJ001-0001.flac")
    t = transcribe(model, processor, audio, word_timestamps=True)
    ref = ("Printing, in the only sense with which we are at present concerned, differs from most if not "
           "from all the arts and crafts represented in the Exhibition")
    assert score([ref], [t.text]).wer < 15
    assert t.words[0].word.lower().startswith("printing") and t.words[0].start < 1.5
    assert all(a.start <= b.start for a, b in zip(t.words, t.words[1:]))
    srt = render(t, "srt")[0]
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0")


@pytest.mark.slow
def test_real_noise_gives_no_text_and_speech_keeps_it(tiny_en):
    """On white noise whisper-tiny.en makes up a sentence ("I'm going to go to the bottom of the wall.");
    the no-speech rule leaves it out, and leaves real speech alone."""
    from tarq.audio import load_audio

    model, processor = tiny_en
    hiss = (np.random.default_rng(0).standard_normal(8 * SR) * 0.2).astype(np.float32)
    assert len(transcribe(model, processor, hiss, no_speech_threshold=None).text.split()) >= 3
    assert transcribe(model, processor, hiss).text == ""
    speech = load_audio(LJ / "LJ001-0001.flac")
    assert transcribe(model, processor, speech) == transcribe(model, processor, speech, no_speech_threshold=None)


@pytest.mark.slow
def test_real_long_form(tiny_en):
    """A 40 s concatenation: long-form decoding must cover the end of the audio, not stop at 30 s."""
    from tarq.audio import load_audio, read_transcripts
    from tarq.metrics import score

    model, processor = tiny_en
    names = [f"LJ001-000{i}.flac" for i in range(1, 7)]
    refs = read_transcripts(LJ / "transcripts.tsv")
    audio = np.concatenate([load_audio(LJ / n) for n in names])
    assert len(audio) / SR > 30
    t = transcribe(model, processor, audio)
    ref = " ".join(refs[n] for n in names)
    assert score([ref], [t.text]).wer < 20
    assert t.segments[-1].end > 35 and t.segments[-1].seek > 0
    [text] = transcribe_batch(model, processor, [audio])
    assert score([ref], [text]).wer < 20


@pytest.mark.slow
def test_real_batch_timing(tiny_en, capsys):
    """Batch 8 must give the same texts as batch 1; prints the per-clip time of each."""
    from tarq.audio import load_audio

    model, processor = tiny_en
    audios = [load_audio(LJ / f"LJ001-00{i:02d}.flac") for i in range(10, 18)]
    t0 = time.perf_counter()
    one = [transcribe_batch(model, processor, [a], batch_size=1)[0] for a in audios]
    t1 = time.perf_counter()
    eight = transcribe_batch(model, processor, audios, batch_size=8)
    t2 = time.perf_counter()
    assert one == eight
    with capsys.disabled():
        print(f"\nwhisper-tiny.en per clip: batch 1 {(t1 - t0) / 8:.2f} s, batch 8 {(t2 - t1) / 8:.2f} s")


@pytest.mark.slow
def test_real_multilingual_request_encodes_once():
    """whisper-base: one encoder pass instead of three (language detected) or two (given), the same transcript."""
    from tarq.audio import load_audio
    from tarq.hub import pull

    if not LJ.is_dir():
        pytest.skip(f"real speech not found at {LJ}")
    model, processor = load(pull("whisper-base"))
    got = encoder_passes(model, processor, load_audio(LJ / "LJ001-0001.flac"))
    assert (got[False][1], got[True][1]) == (3, 1)
    # cross-attention keys: detection, generate and the no-speech step each computed them; shared, the
    # first step alone does and generate reuses them
    assert (got[False][2], got[True][2]) == (3, 1)
    assert_same_transcript(got[True][0], got[False][0])
    assert got[True][0].language == "en"
    assert 0.0 < got[True][0].segments[0].no_speech_prob < 0.5
    # language given: generate and the no-speech step each encoded and projected; now one of each
    given = encoder_passes(model, processor, load_audio(LJ / "LJ001-0001.flac"), language="en")
    assert (given[False][1:], given[True][1:]) == ((2, 2), (1, 1))
    assert_same_transcript(given[True][0], got[True][0])


@pytest.mark.slow
def test_real_translation_of_english_speech_is_english():
    """whisper-base translating English speech gives back about what it transcribes (English into English),
    and says English."""
    import jiwer

    from tarq.audio import load_audio
    from tarq.hub import pull

    if not LJ.is_dir():
        pytest.skip(f"real speech not found at {LJ}")
    model, processor = load(pull("whisper-base"))
    audio = load_audio(LJ / "LJ001-0002.flac")
    heard = transcribe(model, processor, audio)
    translated = transcribe(model, processor, audio, task="translate")
    assert translated.language == "en" and translated.text
    assert jiwer.wer(heard.text.lower(), translated.text.lower()) < 0.3, (heard.text, translated.text)


def test_concurrent_long_form_requests_get_their_own_first_window(short_whisper_dir, tmp_path):
    """Long-form requests in threads on one model: the encoding each detected its language from is handed
    back to its own generate only (the held encoding is per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    audios = [noise(40.0, seed=i) for i in range(2)]
    alone = [transcribe(model, processor, a) for a in audios]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(lambda a: transcribe(model, processor, a), audios))
    for got, want in zip(together, alone):
        assert_same_transcript(got, want)
