"""Temperature fallback (tarq.fallback): openai/whisper's rule, the ladder, which attempt a window keeps, and
what it does inside transcribe() on random weights (where every attempt fails) and on real speech."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tarq import fallback
from tarq.transcribe import _token_logprobs, load, transcribe
from tests.conftest import COMMONVOICE, LJSPEECH
from tests.test_transcribe import assert_same_transcript, encoder_passes, multilingual_copy, noise

LADDER = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ON = {"temperature_increment": 0.2}  # openai/whisper's ladder; transcribe() leaves it off by default


@pytest.fixture(scope="module")
def tiny(short_whisper_dir):
    return load(short_whisper_dir)


@pytest.fixture
def rules(monkeypatch) -> list:
    """The Rule of each transcribe() call that ran one, in order (with what each window kept and how many
    attempts it decoded)."""
    seen, run = [], fallback.Rule.run

    def spy(self, attempt, temperatures):
        if not any(r is self for r in seen):
            seen.append(self)
        return run(self, attempt, temperatures)

    monkeypatch.setattr(fallback.Rule, "run", spy)
    return seen


def test_the_ladder_is_openais():
    assert fallback.temperatures(0.0, 0.2) == LADDER
    assert fallback.temperatures(0.5, 0.2) == (0.5, 0.7, 0.9)
    assert fallback.temperatures(1.0, 0.2) == (1.0,)
    assert fallback.temperatures(0.3, None) == fallback.temperatures(0.3, 0) == (0.3,)
    with pytest.raises(ValueError, match="increment"):
        fallback.temperatures(0.0, -0.2)
    with pytest.raises(ValueError, match="temperature must be in"):
        fallback.temperatures(1.5, 0.2)


def test_the_rule_is_openais():
    rule = dict(compression_ratio_threshold=2.4, logprob_threshold=-1.0, no_speech_threshold=0.6)
    loop = " the cat sat" * 20
    assert fallback.compression_ratio(loop) > 2.4 > fallback.compression_ratio("The cat sat on the mat.")
    assert fallback.needs_fallback(loop, -0.2, 0.01, **rule)  # a loop, however likely
    assert fallback.needs_fallback("The cat sat.", -1.5, 0.01, **rule)  # unlikely
    assert not fallback.needs_fallback("The cat sat.", -0.5, 0.01, **rule)
    assert not fallback.needs_fallback("The cat sat.", -1.5, 0.9, **rule)  # silence: left out, not retried
    assert not fallback.needs_fallback("The cat sat.", -1.5, None, **{**rule, "logprob_threshold": None})
    assert fallback.needs_fallback(loop, -0.2, 0.9, **rule)  # likely, so not silence: the loop is retried
    assert fallback.needs_fallback("The cat sat.", -1.5, None, **rule)  # no-speech unknown: no exemption
    assert not fallback.needs_fallback(loop, -0.2, 0.01, **{**rule, "compression_ratio_threshold": None})


class Scripted(fallback.Rule):
    """A rule whose verdicts are given per temperature: (needs another attempt, loops, mean log-probability)."""

    def __init__(self, verdicts: dict, keep: str = "last", cache=None):
        super().__init__(None, 0, window=lambda: 0, no_speech=lambda _o: None, compression_ratio_threshold=2.4,
                         logprob_threshold=-1.0, no_speech_threshold=0.6, cache=cache, keep=keep)
        self.verdicts = verdicts

    def judge(self, sequence, output, temperature):
        return self.verdicts[sequence]


class Cache:
    def __init__(self):
        self.self_attention_cache = self
        self.resets = 0

    def reset(self):
        self.resets += 1


def attempt(temperature: float) -> tuple:
    return ([temperature], [{}])  # generate_with_fallback's (sequences, outputs, ...) for one clip


def test_a_window_keeps_the_first_attempt_that_passes():
    cache = Cache()
    rule = Scripted({0.0: (True, False, -1.2), 0.2: (False, False, -0.8), 0.4: (False, False, -0.1)}, cache=cache)
    assert rule.run(attempt, LADDER)[0] == [0.2]
    assert (rule.used, rule.attempts, cache.resets) == ({0: 0.2}, {0: 2}, 1)  # emptied before the retry only


def test_when_every_attempt_fails_the_last_or_the_likeliest_that_does_not_loop_is_kept():
    verdicts = {0.0: (True, True, -0.3), 0.2: (True, False, -1.4), 0.4: (True, False, -1.1),
                0.6: (True, True, -0.2), 0.8: (True, False, -2.0), 1.0: (True, False, -2.5)}
    rule = Scripted(verdicts)
    assert rule.run(attempt, LADDER)[0] == [1.0]  # openai/whisper's choice, the default
    assert (rule.used, rule.attempts) == ({0: 1.0}, {0: 6})
    assert Scripted(verdicts, keep="best").run(attempt, LADDER)[0] == [0.4]  # faster-whisper's
    looping = {t: (True, True, lp) for t, (_, _, lp) in verdicts.items()}
    assert Scripted(looping, keep="best").run(attempt, LADDER)[0] == [0.6]  # all loop: the likeliest of all
    with pytest.raises(ValueError, match="keep"):
        Scripted(verdicts, keep="first")


def test_avg_logprob_undoes_the_temperature():
    """Sampling divides the scores by the temperature; the mean log-probability (openai's avg_logprob, the
    rule's and each segment's) is read at temperature 1, <|endoftext|> counted by the rule."""
    torch.manual_seed(1)
    logits = [torch.randn(1, 50) for _ in range(4)]
    tokens = torch.tensor([3, 7, 9, 11])
    plain = fallback.avg_logprob(logits, tokens, 0.0)
    assert fallback.avg_logprob([x / 0.6 for x in logits], tokens, 0.6) == pytest.approx(plain, rel=1e-5)
    want = torch.stack([torch.log_softmax(x[0], -1)[t] for x, t in zip(logits, tokens)]).mean()
    assert plain == pytest.approx(float(want), rel=1e-5)
    seg = {"result": {"scores": [x / 0.6 for x in logits], "sequences": torch.tensor([[50257, 3, 7, 9, 11]])[:, 1:]},
           "idxs": (0, 4)}
    total, count = _token_logprobs(seg, 0.6)
    assert (total / count, count) == (pytest.approx(plain, rel=1e-5), 4)


def test_random_weights_climb_the_whole_ladder_and_stay_deterministic(tiny, rules):
    """Random weights never pass: each window decodes at all six temperatures and keeps the last, the same
    text every time (the fallback samples from a fixed seed), leaving the caller's random state alone."""
    model, processor = tiny
    torch.manual_seed(5)
    first = transcribe(model, processor, noise(4.0), **ON)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert len(rules) == 1 and set(rules[0].attempts.values()) == {6}  # every window (random text may run on)
    assert {s.temperature for s in first.segments} == set(rules[0].used.values()) == {1.0}
    assert transcribe(model, processor, noise(4.0), **ON) == first
    greedy = transcribe(model, processor, noise(4.0))  # the default
    assert len(rules) == 2 and {s.temperature for s in greedy.segments} == {0.0}  # no rule ran for it


def test_from_a_temperature_above_zero_the_ladder_starts_there(tiny, rules):
    model, processor = tiny
    t = transcribe(model, processor, noise(2.0), temperature=0.5, **ON)
    assert len(rules) == 1 and set(rules[0].attempts.values()) == {3}
    assert {s.temperature for s in t.segments} == {0.9}


def test_a_silent_window_is_not_decoded_again(tiny, rules):
    """With every window unlikely (a threshold above any log-probability) and silent (any no-speech
    probability is above 0), the window is left out without a retry; without the no-speech rule it climbs."""
    model, processor = tiny
    gone = transcribe(model, processor, noise(3.0), no_speech_threshold=0.0, logprob_threshold=1e9, **ON)
    assert gone.text == "" and len(rules) == 1 and set(rules[0].attempts.values()) == {1}
    transcribe(model, processor, noise(3.0), no_speech_threshold=None, logprob_threshold=1e9, **ON)
    assert len(rules) == 2 and set(rules[1].attempts.values()) == {6}


def test_retries_decode_on_the_shared_encoding_and_cross_attention(short_whisper_dir, tmp_path):
    """A multilingual short clip: with a shared encoder, all six attempts decode on the one encoding and the
    cross-attention keys and values of the language step (its cache emptied of the previous attempt's
    tokens); without, each attempt encodes and projects again (and language detection and the no-speech step
    once each). Same transcript both ways."""
    model, processor = multilingual_copy(short_whisper_dir, tmp_path / "m")
    got = encoder_passes(model, processor, noise(4.0), temperature_increment=0.2)
    assert (got[False][1:], got[True][1:]) == ((1 + 6 + 1, 1 + 6 + 1), (1, 1))
    assert_same_transcript(got[True][0], got[False][0])
    assert {s.temperature for s in got[True][0].segments} <= set(LADDER)


def test_long_form_windows_each_climb_their_own_ladder(tiny, rules):
    model, processor = tiny
    audio = np.concatenate([noise(15.0, seed=s) for s in range(3)])
    t = transcribe(model, processor, audio, **ON)
    used = rules[0].used
    assert len(rules) == 1 and len(used) > 1 and set(rules[0].attempts.values()) == {6}
    seeks = sorted({s.seek for s in t.segments})
    assert len(seeks) > 1
    for i, seek in enumerate(seeks):
        assert {s.temperature for s in t.segments if s.seek == seek} == {used[i]}


def test_a_greedy_request_beside_a_falling_back_one_stays_greedy(tiny):
    """The rule is per thread: a request without fallback, run beside one with it on the same model, decodes
    exactly as alone."""
    model, processor = tiny
    audios = [noise(3.0, seed=i) for i in range(4)]
    alone = [transcribe(model, processor, a, temperature_increment=None) for a in audios]
    with ThreadPoolExecutor(max_workers=4) as pool:
        mixed = list(pool.map(lambda i: transcribe(model, processor, audios[i // 2],
                                                   temperature_increment=None if i % 2 else 0.2), range(8)))
    for i, got in enumerate(mixed):
        if i % 2:
            assert got == alone[i // 2]
        else:
            assert {s.temperature for s in got.segments} <= set(LADDER)
            assert [s.no_speech_prob for s in got.segments][:1] == \
                pytest.approx([s.no_speech_prob for s in alone[i // 2].segments][:1], rel=1e-4)


@pytest.mark.slow
def test_real_speech_falls_back_only_where_greedy_is_unsure(tiny_en, rules):
    """whisper-tiny.en is unsure of a Common Voice clip (greedy: "Use button moderate.", mean log-probability
    below -1): the fallback decodes it again and keeps a sampled attempt, the same one each time. A clear
    LJSpeech clip decodes once, to the greedy text."""
    from tarq.audio import load_audio

    model, processor = tiny_en
    hard = load_audio(COMMONVOICE / "common_voice_en_18265925.flac")
    greedy = transcribe(model, processor, hard, temperature_increment=None)
    assert greedy.segments[0].avg_logprob < -1.0
    kept = transcribe(model, processor, hard, **ON)
    assert rules[0].attempts[0] > 1 and kept.segments[0].temperature > 0
    assert kept.text != greedy.text and transcribe(model, processor, hard, **ON) == kept
    clear = load_audio(LJSPEECH / "LJ001-0001.flac")
    assert transcribe(model, processor, clear, **ON) == transcribe(model, processor, clear)
    assert rules[-1].attempts == {0: 1}


def test_a_transformers_with_another_ladder_signature_keeps_its_own(short_whisper_dir, caplog):
    """Should transformers rename generate_with_fallback's arguments, the rule is not put in (a warning says
    so) and transcription still works: transformers' ladder with no thresholds keeps the first attempt."""
    model, processor = load(short_whisper_dir)

    class Renamed(type(model)):
        def generate_with_fallback(self, *args, **kwargs):
            return super().generate_with_fallback(*args, **kwargs)

    model.__class__ = Renamed
    with caplog.at_level("WARNING", logger="tarq.fallback"):
        t = transcribe(model, processor, noise(2.0), **ON)
    assert "left to transformers" in caplog.text
    assert {s.temperature for s in t.segments} == {0.0}
    assert t == transcribe(model, processor, noise(2.0))  # greedy
