"""The integer grid: per-group scale/zero search, quantize, dequantize.

Convention (GPTQ's): codes q are unsigned in [0, 2^bits - 1] and w ~= scale * (q - zero).
Symmetric grids use zero = 2^(bits-1), so q - zero is the signed code in [-2^(bits-1), 2^(bits-1) - 1];
that signed form is what the artifact stores (compressed-tensors' convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A weight on the grid. codes [out, in] uint8; scale [out, groups] float32; zero [out, groups] int32;
    g_idx [in] int32: the group of each input column (not monotone under act-order)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool

    def dequantize(self) -> torch.Tensor:
        idx = self.g_idx.long()
        scale = self.scale[:, idx]
        zero = self.zero[:, idx].to(scale.dtype)
        return scale * (self.codes.to(scale.dtype) - zero)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Rows [start, stop): splits a jointly solved q/k/v stack back into its layers."""
        return QuantizedWeight(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop],
                               self.g_idx, self.bits, self.group_size, self.sym)


def find_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False,
                grid: int = 100, maxshrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of `w` [rows, cols] (one group of columns). Returns float scale [rows]
    and float (integer-valued) zero [rows]. With `mse`, shrinks the range to minimise |w - q|^2.4
    as GPTQ's reference quantizer does."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (hi - lo) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s, z = params(p * xmin, p * xmax)
            err = (dequantize(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None]) - w)
            err = err.abs().pow(2.4).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) for w given broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False) -> QuantizedWeight:
    """Round-to-nearest on the same per-group grid GPTQ uses; the baseline with no data."""
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of group size {group_size}")
    maxq = 2**bits - 1
    groups = w.float().reshape(rows, cols // group_size, group_size)
    flat = groups.permute(1, 0, 2).reshape(-1, group_size)
    scale, zero = find_params(flat, bits, sym, mse)
    scale = scale.reshape(cols // group_size, rows).T.contiguous()
    zero = zero.reshape(cols // group_size, rows).T.contiguous()
    codes = quantize(groups, scale[..., None], zero[..., None], maxq).reshape(rows, cols)
    g_idx = torch.arange(cols, dtype=torch.int32) // group_size
    return QuantizedWeight(codes.to(torch.uint8), scale, zero.to(torch.int32), g_idx, bits, group_size, sym)
