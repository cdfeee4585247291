"""QuantLinear: a Linear layer that holds packed integer weights, and the kernels that run it.

Storage follows compressed-tensors' `pack-quantized` convention so the artifact means to the library
what it means to us:
  weight_packed      int32 [out, ceil(in*bits/32)]: compressed_tensors' own `pack_to_int32` of the signed
                     codes q - 2^(bits-1), packed densely along the input dim (it re-adds the offset, so
                     each bit field holds q; eight 4-bit fields per word, first column lowest)
  weight_scale       float [out, groups]
  weight_zero_point  int32 [ceil(out*bits/32), groups]: signed zeros z - 2^(bits-1), packed along dim 0
                     (asymmetric only; symmetric grids have z = 2^(bits-1), i.e. signed zero 0)
  weight_g_idx       int32 [in]: only when act-order left a non-trivial column->group map
  weight_shape       int64 [2]: (out, in)
The library dequantizes as (q_signed - zero_signed) * scale = (q - z) * scale: GPTQ's scale * (code - zero).

Inference dispatch (`QuantLinear.kernel` says which path the last forward took, `QuantLinear.calls` counts
them; `counting_kernels(model)` sums the calls of one run, which the CLI, the worker and the API report):
  "int4pack-cpu"  4 bits, trivial g_idx, CPU: aten._weight_int4pack_mm_for_cpu. The op accepts fp32/fp16/
                  bf16 activations, but on torch 2.13 only bf16 takes its fast path (fp32 and fp16 run
                  ~30-90x slower than bf16, slower than a dense fp32 matmul), so activations are cast to
                  `QuantLinear.cpu_compute_dtype` (bf16; None = the input dtype, exact but slow) and the
                  output is cast back.
  "tinygemm-cuda" 4 bits, trivial g_idx, CUDA sm80+: aten._weight_int4pack_mm (tinygemm, bf16 only: the input
                  is cast to bf16 and the output back to the input dtype)
  "dequant-bf16"  on CPUs where bf16 matmuls pay (`cpu_dense_dtype`), float32 inputs that the kernel does
                  not take (inputs with more than `cpu_kernel_max_rows` rows, where it is slower than
                  dequantize + GEMM: Whisper's encoder; 3/8 bits; act-order): dequantize to bf16
                  (transient) and matmul in bf16, output cast back.
  "dequant"       everything else: dequantize (transient) and matmul in the input dtype.
Both int4 kernels compute w = (q - 8) * scale + zero_f, so GPTQ's integer zero z maps exactly to
zero_f = (8 - z) * scale. The kernel layout is built lazily once per (device, dtype) and cached outside the
state dict.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import CPU_BF16_CHOICES
from .quantizer import QuantizedWeight

log = logging.getLogger(__name__)

KERNELS = ("int4pack-cpu", "tinygemm-cuda", "dequant-bf16", "dequant")
# tinygemm's inner k tiling: K must be a multiple of inner_k_tiles * 16; 8 is what torchao uses.
_TINYGEMM_INNER_K_TILES = (8, 4, 2)
_TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


def _ct_packing():
    # compressed_tensors' package import pulls in transformers and torchao (~seconds); only packing needs it.
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    return pack_to_int32, unpack_from_int32


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [out, in] in [0, 2^bits-1] -> int32 [out, ceil(in*bits/32)] (compressed-tensors)."""
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    return _ct_packing()[0](signed, bits, packed_dim=1)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack`: int32 words -> unsigned codes uint8 [out, in]."""
    signed = _ct_packing()[1](packed, bits, torch.Size(shape), packed_dim=1)
    return (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def pack_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zeros [out, groups] -> int32 [ceil(out*bits/32), groups], packed along the output dim as
    compressed-tensors packs asymmetric zero points."""
    signed = (zero.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    return _ct_packing()[0](signed, bits, packed_dim=0)


def unpack_zero(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    signed = _ct_packing()[1](packed, bits, torch.Size(shape), packed_dim=0)
    return signed.to(torch.int32) + (1 << (bits - 1))


def trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when column i sits in group i // group_size (no act-order permutation to honour)."""
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    return bool(torch.equal(g_idx.long(), expected))


def cpu_bf16_flags() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


# bf16 must beat float32 by this much in the probe before `auto` takes it: the probe is three timings on
# a possibly busy host, and a wrong yes costs accuracy as well as time
BF16_MIN_SPEEDUP = 1.15


def bf16_matmul_speedup(rows: int = 1500, cols: int = 512, out: int = 2048, reps: int = 5) -> float:
    """float32 time / bf16 time of one x [rows, cols] @ W^T [cols, out] on this CPU, best of `reps` each
    after a warm-up. The default is a whisper-base encoder fc1 over one clip's 1500 frames, the matmul
    that decides whether bf16 pays (decoding steps take the int4 kernel either way). The two dtypes take
    turns, so that a burst of load on a shared host slows both alike instead of one."""
    g = torch.Generator().manual_seed(0)  # not the global generator: first use must not shift seeded runs
    x, w = torch.randn(rows, cols, generator=g), torch.randn(out, cols, generator=g)
    pairs = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, math.inf)
    for a, b in pairs.values():
        F.linear(a, b)  # warm-up
    for _ in range(reps):
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            F.linear(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


@functools.cache
def cpu_bf16_probe() -> float | None:
    """`bf16_matmul_speedup` measured once per process (a fraction of a second), and only on CPUs with
    bf16 instructions: where bf16 is emulated it is always slower (None: not measured)."""
    if not cpu_bf16_flags():
        return None
    speedup = bf16_matmul_speedup()
    log.info("bf16 matmul %.2fx float32 on this CPU: %s", speedup,
             "using bf16" if speedup >= BF16_MIN_SPEEDUP else f"staying in float32 (below {BF16_MIN_SPEEDUP}x)")
    return speedup


def cpu_bf16_pays() -> bool:
    """Whether float32 matmuls should run in bf16 on this CPU: it has bf16 instructions and the probe
    measured bf16 at least BF16_MIN_SPEEDUP x float32. The flags alone do not say it: on a 2-core Intel
    Xeon with AVX512-BF16 but no AMX, a bf16 whisper-base encoder layer ran at 0.67-0.82x the float32 one."""
    speedup = cpu_bf16_probe()
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


def cpu_dense_dtype_from_env() -> torch.dtype | None:
    """TARQ_CPU_BF16: "auto" (default: bf16 where `cpu_bf16_pays`), "1" (always) or "0" (never:
    dequantized matmuls stay in the input dtype, e.g. for bit-for-bit fp32 comparisons)."""
    choice = os.environ.get("TARQ_CPU_BF16", "auto").strip().lower()
    if choice not in CPU_BF16_CHOICES:
        raise ValueError(f"TARQ_CPU_BF16 must be auto, 0 or 1, not {choice!r}")
    use = cpu_bf16_pays() if choice == "auto" else choice == "1"
    return torch.bfloat16 if use else None


def packed_cols(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 32)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W held as packed integer codes, per-group scales and zero points."""

    # Dtype the CPU int4 kernel computes in (see the module docstring); None keeps the input dtype.
    cpu_compute_dtype: torch.dtype | None = torch.bfloat16
    # Above this many input rows the CPU kernel loses to dequantize + dense matmul (at 1500 rows, a Whisper
    # encoder pass, it runs at ~0.4x the fp32 matmul; at 1-8 rows, decoding, 0.4-1.1x on a 2-core AMX
    # Xeon (bench/results/kernels.md), 0.6-1.6x on a 2-core AVX2 EPYC, 2-3x on an AVX-512 Xeon without
    # AMX). None: always use the kernel.
    cpu_kernel_max_rows: int | None = 128
    # Dtype of the dequantize + matmul path for float32 inputs on CPU: bf16 where it pays here (AMX: 2.0-2.2x
    # the fp32 matmul at 1500 rows, kernels.md), float32 elsewhere. None: the input dtype. "auto": decided
    # on first use by TARQ_CPU_BF16 (cpu_dense_dtype_from_env; its probe is not run at import).
    cpu_dense_dtype: torch.dtype | None | str = "auto"

    @classmethod
    def dense_dtype(cls) -> torch.dtype | None:
        if cls.cpu_dense_dtype == "auto":
            cls.cpu_dense_dtype = cpu_dense_dtype_from_env()
        return cls.cpu_dense_dtype

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, sym: bool,
                 bias: bool, g_idx: bool = False, scale_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in [1, 8], not {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_cols(in_features, bits),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale",
                             torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        if not sym:
            self.register_buffer("weight_zero_point", torch.zeros(packed_cols(out_features, bits), groups,
                                                                  dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        if g_idx:
            self.register_buffer("weight_g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.weight_g_idx = None
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64,
                                                          device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.kernel: str | None = None  # the path the last forward took
        self.calls: Counter[str] = Counter()  # forwards by path since the layer was built (`kernel_calls`)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        out_features, in_features = qw.shape
        if qw.sym and not bool((qw.zero == 1 << (qw.bits - 1)).all()):
            raise ValueError("a symmetric QuantizedWeight must have every zero equal to 2^(bits-1)")
        has_g_idx = not trivial_g_idx(qw.g_idx, qw.group_size)
        device = qw.codes.device
        layer = cls(in_features, out_features, bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
                    bias=bias is not None, g_idx=has_g_idx, scale_dtype=qw.scale.dtype, device=device)
        layer.weight_packed.copy_(pack(qw.codes, qw.bits))
        layer.weight_scale.copy_(qw.scale)
        if not qw.sym:
            layer.weight_zero_point.copy_(pack_zero(qw.zero, qw.bits))
        if has_g_idx:
            layer.weight_g_idx.copy_(qw.g_idx.to(torch.int32))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    # -- views of the stored weight -----------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        if self.bits == 4 and sys.byteorder == "little":
            # The library's 4-bit unpack, minus its signed-offset round trip: each byte holds two codes,
            # the earlier column in the low nibble.
            b = self.weight_packed.view(torch.uint8)
            return torch.stack((b & 0xF, b >> 4), dim=-1).view(self.out_features, -1)[:, :self.in_features]
        return unpack(self.weight_packed, self.bits, (self.out_features, self.in_features))

    def zeros(self) -> torch.Tensor:
        groups = self.in_features // self.group_size
        if self.sym:
            return torch.full((self.out_features, groups), 1 << (self.bits - 1), dtype=torch.int32,
                              device=self.weight_packed.device)
        return unpack_zero(self.weight_zero_point, self.bits, (self.out_features, groups))

    def g_idx(self) -> torch.Tensor:
        if self.weight_g_idx is not None:
            return self.weight_g_idx
        return (torch.arange(self.in_features, device=self.weight_packed.device) // self.group_size).int()

    def to_quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes(), self.weight_scale.float(), self.zeros(), self.g_idx(),
                               self.bits, self.group_size, self.sym)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weight [out, in], computed in float32 exactly as QuantizedWeight.dequantize, then cast."""
        if self.weight_g_idx is not None:
            return self.to_quantized().dequantize().to(dtype or self.weight_scale.dtype)
        # contiguous groups: a [out, groups, group_size] view instead of gathering per column, updated in
        # place on one float32 buffer (the out-of-place broadcasting form was several times slower, and
        # the encoder dequantizes on every call)
        groups = self.in_features // self.group_size
        w = self.codes().view(self.out_features, groups, self.group_size).to(torch.float32)
        w.sub_(self.zeros().float()[..., None]).mul_(self.weight_scale.float()[..., None])
        return w.view(self.out_features, self.in_features).to(dtype or self.weight_scale.dtype)

    # -- kernels ------------------------------------------------------------------------------------
    def _kernel_for(self, x: torch.Tensor) -> str:
        on_cpu = x.device.type == "cpu"
        dense = "dequant-bf16" if on_cpu and x.dtype == torch.float32 and self.dense_dtype() else "dequant"
        if self.bits != 4 or self.weight_g_idx is not None:
            return dense
        if on_cpu and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") \
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and self.in_features % 2 == 0:
            rows = x.numel() // self.in_features
            if self.cpu_kernel_max_rows is not None and rows > self.cpu_kernel_max_rows:
                return dense
            return "int4pack-cpu"
        if x.device.type == "cuda" and self._tinygemm_ok(x.device):
            return "tinygemm-cuda"
        return dense

    # sm80 or newer, per CUDA device, asked once: the driver query is not a tensor op, and inside a
    # torch.compile trace (the compiled decoding step) it would break the graph at every QuantLinear;
    # the eager prefill has filled this in by then
    _sm80: ClassVar[dict[str, bool]] = {}

    def _tinygemm_ok(self, device: torch.device) -> bool:
        sm80 = QuantLinear._sm80.get(str(device))
        if sm80 is None:
            sm80 = QuantLinear._sm80[str(device)] = torch.cuda.get_device_capability(device)[0] >= 8
        return (sm80
                and self.group_size in _TINYGEMM_GROUP_SIZES
                and self.out_features % 8 == 0
                and any(self.in_features % (t * 16) == 0 for t in _TINYGEMM_INNER_K_TILES))

    def _scale_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        # [groups, out, 2]: (scale, zero_f) with zero_f = (8 - z) * scale, torchao's tinygemm layout.
        scale = self.weight_scale.float()
        zero_f = (8 - self.zeros().float()) * scale
        return torch.stack([scale, zero_f], dim=-1).transpose(0, 1).contiguous().to(dtype)

    def _kernel_weights(self, kernel: str, device: torch.device, dtype: torch.dtype):
        key = (kernel, str(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            codes = self.codes().to(device)
            if kernel == "int4pack-cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            else:  # tinygemm: two codes per byte, even column in the high nibble (torchao's layout)
                codes = codes.to(torch.int32)
                u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
                tiles = next(t for t in _TINYGEMM_INNER_K_TILES if self.in_features % (t * 16) == 0)
                packed = torch.ops.aten._convert_weight_to_int4pack(u8, tiles)
            cached = (packed, self._scale_and_zeros(dtype).to(device))
            self._cache[key] = cached
        return cached

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the module invalidates the kernel layouts built for the old device/dtype.
        self._cache = {}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel_for(x)
        self.kernel = kernel
        if not torch.compiler.is_compiling():
            # a traced graph would guard on the count's value and recompile at every call
            self.calls[kernel] += 1
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if kernel == "int4pack-cpu":
            dtype = self.cpu_compute_dtype or x.dtype
            packed, sz = self._kernel_weights(kernel, x.device, dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(dtype).contiguous(), packed,
                                                           self.group_size, sz)
        elif kernel == "tinygemm-cuda":
            packed, sz = self._kernel_weights(kernel, x.device, torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed,
                                                   self.group_size, sz)
        else:
            dtype = self.dense_dtype() if kernel == "dequant-bf16" else x.dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            y = F.linear(x2.to(dtype), self.dequantize(dtype), bias)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            # bf16 + the bias in x's dtype promotes: the add and the cast back are one pass (decoding
            # calls are ~25 us, each extra op is a visible share)
            y = torch.add(y, self.bias.to(x.dtype))
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, "
                f"act_order={self.weight_g_idx is not None}")


def kernel_calls(model: nn.Module) -> Counter[str]:
    """The model's QuantLinear forwards so far, by kernel path, summed over its layers (calls made inside a
    torch.compile'd graph are not counted)."""
    total: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total.update(module.calls)
    return total


@contextmanager
def counting_kernels(model: nn.Module) -> Iterator[dict[str, int]]:
    """Yields a dict that, once the block ends, holds the QuantLinear forwards made in it by kernel path
    (empty for a model without quantized layers). Another thread running the same model at the same
    time would add its calls."""
    counts: dict[str, int] = {}
    before = kernel_calls(model)
    try:
        yield counts
    finally:
        counts.update(sorted((kernel_calls(model) - before).items()))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> nn.Module:
    """Swap each named nn.Linear for a QuantLinear built from its QuantizedWeight (in place; returns model).
    The bias is kept in the Linear's dtype; the float weight is dropped."""
    for name, qw in quantized.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"model has no module named {name!r}") from exc
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"module {name!r} is {type(linear).__name__}, not nn.Linear")
        if tuple(qw.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"quantized weight for {name!r} has shape {tuple(qw.shape)}, "
                             f"the layer has {(linear.out_features, linear.in_features)}")
        _set_module(model, name, QuantLinear.from_quantized(qw, linear.bias).to(linear.weight.device))
    return model
