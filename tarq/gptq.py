"""GPTQ as plain functions: Hessian accumulation and the column sweep.

Follows IST-DASLab/gptq: damp the Hessian, take the upper Cholesky factor of its inverse, quantize one
column at a time and push each column's error onto the columns not yet quantized, in lazy blocks so
that most of the work is one matmul per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import QuantizedWeight, dequantize, find_params, quantize


def accumulate(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += x^T x for x [positions, columns]; float32 whatever x's dtype."""
    x = x.reshape(-1, x.shape[-1]).float()
    H.addmm_(x.T, x)


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I; columns never seen (zero diagonal) get a unit diagonal."""
    H = H.clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    return H


def h_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the reconstruction error sum_t |W x_t - Q x_t|^2 this H stands for."""
    E = (W - Q).float()
    return float(torch.einsum("ij,jk,ik->", E, H, E))


@dataclass
class GPTQResult:
    weight: torch.Tensor  # the dequantized weight, same shape and dtype float32 as W
    quant: QuantizedWeight


def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = False,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> GPTQResult:
    """Quantize W [rows, cols] against the quadratic form H [cols, cols].

    Rows are independent given H, so layers that read the same input can be stacked on rows and
    solved in one call."""
    rows, cols = W.shape
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of group size {group_size}")
    maxq = 2**bits - 1
    W = W.detach().float().clone()
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    Hd = damped(H.float(), damp)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(Hd), descending=True)
        W = W[:, perm]
        Hd = Hd[perm][:, perm]

    L = torch.linalg.cholesky(Hd)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    del L, Hd

    # Blocks must hold whole groups so that a group's scale is found on columns that already
    # received every earlier block's error.
    block = max(block_size // group_size, 1) * group_size
    n_groups = cols // group_size
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)

    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                s, z = find_params(W1[:, i:i + group_size], bits, sym)
                g = col // group_size
                scales[:, g], zeros[:, g] = s, z
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize(w, s, z, maxq)
            codes[:, col] = q
            Q1[:, i] = dequantize(q, s, z)
            err = (w - Q1[:, i]) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = torch.arange(cols, dtype=torch.int32, device=W.device) // group_size
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        codes = codes[:, inv]
        g_idx = g_idx[inv]
    quant = QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.int32), g_idx.to(torch.int32),
                            bits, group_size, sym)
    return GPTQResult(Q, quant)
