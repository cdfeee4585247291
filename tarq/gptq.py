"""GPTQ as plain functions: Hessian accumulation and the column sweep.

Follows IST-DASLab/gptq: damp the Hessian, take the upper Cholesky factor of its inverse, quantize one
column at a time and push each column's error onto the columns not yet quantized, in lazy blocks so
that most of the work is one matmul per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from .quantizer import QuantizedWeight, find_params


def accumulate(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += x^T x for x [positions, columns]; float32 whatever x's dtype."""
    x = x.reshape(-1, x.shape[-1]).float()
    H.addmm_(x.T, x)


# Column stripes of about this width keep each product one large matmul.
STRIPE = 512


def accumulate_upper(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += x^T x on and above the diagonal blocks only; `mirror_upper(H)` gives the whole matrix.

    H is symmetric, and torch has no symmetric rank-k update: a stripe of rows at a time from its
    diagonal block rightwards skips most of the lower triangle. For fc2's 2048 columns that is 4 stripes
    and 10/16 of the products (`python bench/speed.py --parts solver` times both)."""
    x = x.reshape(-1, x.shape[-1]).float()
    cols = x.shape[1]
    stripes = max(2, round(cols / STRIPE)) if cols >= STRIPE else 1
    bounds = torch.linspace(0, cols, stripes + 1).round().long().tolist()
    for a, b in pairwise(bounds):
        H[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def mirror_upper(H: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is H's."""
    upper = torch.triu(H)
    return upper + torch.triu(H, 1).T


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
    return float(row_energy(W - Q, H).sum())


def row_energy(A: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """diag(A H A^T), one value per row: any row block's share of tr(A H A^T) without another product."""
    A = A.float()
    return ((A @ H) * A).sum(1)


@dataclass
class GPTQResult:
    weight: torch.Tensor  # the dequantized weight, same shape and dtype float32 as W
    quant: QuantizedWeight


@dataclass
class Prepared:
    """What the sweep needs from H, computed once: the upper Cholesky factor of the damped inverse (in
    act-order's column order) and the permutation. Its three O(cols^3) factorizations cost more than the
    sweep itself for wide layers (fc2), and TARQ solves twice against the same H."""

    hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor  # bool [cols]: columns H never saw
    damp: float
    act_order: bool
    chol: torch.Tensor  # lower Cholesky factor of the damped H (permuted like hinv)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """(H + delta I)^-1 B for B [cols, k], from the factor already computed."""
        if self.perm is None:
            return torch.cholesky_solve(B, self.chol)
        return torch.cholesky_solve(B[self.perm], self.chol)[torch.argsort(self.perm)]


def prepare(H: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> Prepared:
    dead = torch.diagonal(H) == 0
    Hd = damped(H.float(), damp)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(Hd), descending=True)
        Hd = Hd[perm][:, perm]
    L = torch.linalg.cholesky(Hd)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return Prepared(hinv, perm, dead, damp, act_order, L)


def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = False,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False,
         prepared: Prepared | None = None) -> GPTQResult:
    """Quantize W [rows, cols] against the quadratic form H [cols, cols].

    Rows are independent given H, so layers that read the same input can be stacked on rows and
    solved in one call. `prepared` (from `prepare(H, damp, act_order)`) skips the factorizations when
    several solves share one H."""
    rows, cols = W.shape
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of group size {group_size}")
    if prepared is None:
        prepared = prepare(H, damp, act_order)
    elif (prepared.damp, prepared.act_order, prepared.hinv.shape[0]) != (damp, act_order, cols):
        raise ValueError(f"prepared H is for damp={prepared.damp}, act_order={prepared.act_order}, "
                         f"{prepared.hinv.shape[0]} columns; this solve asks damp={damp}, "
                         f"act_order={act_order}, {cols} columns")
    maxq = 2**bits - 1
    perm, Hinv = prepared.perm, prepared.hinv
    W = W.detach().float()
    # one copy either way (the sweep writes into W): the permutation's gather, or a clone
    W, dead = (W[:, perm], prepared.dead[perm]) if perm is not None else (W.clone(), prepared.dead)
    W[:, dead] = 0

    # Blocks must hold whole groups so that a group's scale is found on columns that already
    # received every earlier block's error.
    block = max(block_size // group_size, 1) * group_size
    n_groups = cols // group_size
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float32, device=W.device)

    # The sweep's scratch tensors live in inference mode (less per-op bookkeeping, ~15% here); what it
    # writes goes into the ordinary tensors above, so no inference tensor leaves this function.
    with torch.inference_mode():
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            n = i2 - i1
            # The column sweep works on the block transposed ([column, row], each column contiguous) and
            # writes every result straight into its destination row with out=/in-place ops: the sweep is
            # bound by per-op overhead, not arithmetic, and this halves the ops per column. Each value is
            # computed by the same float operations in the same order as the textbook loop (see
            # tests/test_gptq_reference.py), so the results are bit-for-bit the same.
            W1 = W[:, i1:i2].T.contiguous()
            Q1 = torch.empty_like(W1)
            C1 = torch.empty_like(W1)
            Err1 = torch.empty_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1)
            upd = torch.empty_like(W1)  # scratch for the rank-1 update
            w_, q_, c_, e_ = W1.unbind(0), Q1.unbind(0), C1.unbind(0), Err1.unbind(0)
            h_, d_ = Hinv1.unbind(0), d.unbind(0)
            for i in range(n):
                col = i1 + i
                if col % group_size == 0:
                    s, z = find_params(W1[i:i + group_size].T, bits, sym)
                    g = col // group_size
                    scales[:, g], zeros[:, g] = s, z
                w, q, qd, err = w_[i], c_[i], q_[i], e_[i]
                # q = clamp(round(w / s) + z, 0, maxq); qd = s * (q - z); err = (w - qd) / d
                torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
                torch.sub(q, z, out=qd).mul_(s)
                torch.sub(w, qd, out=err).div_(d_[i])
                if i + 1 < n:
                    # W1[:, i+1:] -= err[:, None] * Hinv1[i, i+1:][None, :] (product first, then subtract)
                    u = upd[i + 1:]
                    torch.mul(h_[i][i + 1:, None], err[None, :], out=u)
                    W1[i + 1:].sub_(u)
            Q[:, i1:i2] = Q1.T
            codes[:, i1:i2] = C1.T
            W[:, i2:] -= Err1.T.contiguous() @ Hinv[i1:i2, i2:]

    g_idx = torch.arange(cols, dtype=torch.int32, device=W.device) // group_size
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        codes = codes[:, inv]
        g_idx = g_idx[inv]
    quant = QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.int32), g_idx.to(torch.int32),
                            bits, group_size, sym)
    return GPTQResult(Q, quant)
