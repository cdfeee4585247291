"""QuantConfig: everything that decides what a quantization run produces."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

Method = Literal["tarq", "gptq", "rtn"]
EncoderTagging = Literal["common", "frames"]
ResidualStep = Literal["paper", "full"]
Sequential = Literal["block", "layer"]
LambdaPositions = Literal["all", "text"]
ORDERS: tuple[str, ...] = get_args(Sequential)
# What a model computes in when it transcribes (tarq.transcribe.compute_dtype); here, free of torch, for
# the CLI and the service settings
ComputeDtype = Literal["float32", "bfloat16", "float16", "auto"]
DTYPES: tuple[str, ...] = get_args(ComputeDtype)
# TARQ_CPU_BF16 (tarq.qlinear.cpu_dense_dtype_from_env), for the service settings too
CpuBf16 = Literal["auto", "0", "1"]
CPU_BF16_CHOICES: tuple[str, ...] = get_args(CpuBf16)
# openai/whisper's transcribe() defaults (tarq.transcribe): a window whose no-speech probability is above
# NO_SPEECH_THRESHOLD and whose tokens average a log-probability below LOGPROB_THRESHOLD is silence, and its
# text (what Whisper makes up on silence and noise: "you", "I'm going to go to the next one.") is left out
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
# openai/whisper's temperature fallback (OpenAI's API at temperature 0; tarq.fallback): a window whose text
# compresses by more than COMPRESSION_RATIO_THRESHOLD with zlib (a loop) or whose tokens average a
# log-probability below LOGPROB_THRESHOLD is decoded again, sampling at a temperature TEMPERATURE_INCREMENT
# higher, up to 1.0. Off unless asked for: it retried 0-5% of the windows of real speech (14-51% with loud
# noise added) and made WER worse wherever it acted, most on noisy speech through an int4 model
# (bench/results/fallback.md)
COMPRESSION_RATIO_THRESHOLD = 2.4
TEMPERATURE_INCREMENT = 0.2  # openai/whisper's, for those who turn it on


@dataclass(frozen=True)
class QuantConfig:
    method: Method = "tarq"
    bits: int = 4
    group_size: int = 128
    # Asymmetric (uint codes + per-group zero point) is the GPTQ default; TARQ.md leaves the choice open.
    sym: bool = False
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = False
    block_size: int = 128  # GPTQ lazy-batch width
    # TARQ
    zipf_threshold: float = 3.0
    digits_are_tail: bool = True  # wordfreq folds digit strings, so "1455" would look common
    rarebal: bool = True
    residual: bool = True
    lambda_cost: float = 1.0  # c in lambda = c * tr(Hc) / tr(Ht)
    # Which common positions tr(Hc) counts in lambda. "all": every one (TARQ.md). "text": only those that read
    # a text token, not the prompt's special tokens, which stay in Hc itself: in whisper-base's decoder block 2
    # the position reading <|en|> holds ~98% of fc2's input energy (a massive activation), so with "all" that
    # one position sets lambda (591 in that layer). An experiment of this project, not the paper's method.
    lambda_positions: LambdaPositions = "all"
    # "paper": alpha = <E, D>_H / <D, D>_H as TARQ.md gives it; "full": alpha = 1, the plain
    # least-squares target W + D (an experiment of this project, not the paper's method)
    residual_step: ResidualStep = "paper"
    encoder_tagging: EncoderTagging = "common"
    # "block": every group of a block is solved on inputs captured in one pass through the block before
    # any of it is quantized, then x advances through the quantized block (two passes per block, TARQ
    # three). "layer": each group's inputs are captured after the groups before it in the block are
    # quantized (GPTQ's "true sequential"), so a residual correction earlier in the block is not
    # corrected again by later groups; the forwards pause before each group (tarq.paused_forward), one
    # pass per block and stream, holding every batch's activations inside the block meanwhile.
    sequential: Sequential = "block"
    # What the calibration forward passes compute in (torch.autocast; the weights, the activation streams'
    # residual path, the Hessians and the solves stay float32). "auto" as for transcription: float16 on
    # CUDA, bfloat16 on CPUs where it measures faster, float32 elsewhere (tarq.transcribe.compute_dtype).
    forward_dtype: ComputeDtype = "float32"
    # calibration
    num_samples: int = 128
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("tarq", "gptq", "rtn"):
            raise ValueError(f"method must be tarq, gptq or rtn, not {self.method!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, not {self.bits}")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, not {self.group_size}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), not {self.damp}")
        if self.encoder_tagging not in ("common", "frames"):
            raise ValueError(f"encoder_tagging must be common or frames, not {self.encoder_tagging!r}")
        if self.residual_step not in ("paper", "full"):
            raise ValueError(f"residual_step must be paper or full, not {self.residual_step!r}")
        if self.sequential not in ORDERS:
            raise ValueError(f"sequential must be block or layer, not {self.sequential!r}")
        if self.forward_dtype not in DTYPES:
            raise ValueError(f"forward_dtype must be one of {', '.join(DTYPES)}, not {self.forward_dtype!r}")
        if self.num_samples <= 0 or self.batch_size <= 0:
            raise ValueError("num_samples and batch_size must be positive")
        if not 0 < self.lambda_cost < math.inf:  # written so that NaN fails too
            raise ValueError(f"lambda_cost must be positive and finite, not {self.lambda_cost}")
        if self.lambda_positions not in ("all", "text"):
            raise ValueError(f"lambda_positions must be all or text, not {self.lambda_positions!r}")
        if not 0 < self.zipf_threshold <= 8:
            # wordfreq's Zipf scale: log10 of uses per billion words, from 0 (unseen) to about 8 ("the")
            raise ValueError(f"zipf_threshold must be in (0, 8], not {self.zipf_threshold}")

    @property
    def uses_tags(self) -> bool:
        return self.method == "tarq" and self.rarebal

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown quantization settings: {', '.join(sorted(unknown))}")
        return cls(**data)
