"""TARQ's two additions to GPTQ, as in the paper: RAREBAL and the residual correction.

RAREBAL splits the Hessian by tail tag and reweights the tail so it carries as much trace mass as the
common positions. The residual correction moves the pilot's target along the least-squares fix for
the input drift between the full-precision stream (x_fp) and the partially quantized one (x).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .gptq import GPTQResult, Prepared, accumulate_upper, damped, gptq, mirror_upper, prepare
from .quantizer import rtn


@dataclass
class LayerStats:
    """Second moments of one layer's inputs over the calibration positions, float32.

    Hc and Ht are the common and tail halves of H = sum x x^T over the quantized stream's inputs (each
    accumulated on its upper triangle and mirrored when read); Hdelta = sum (x_fp - x) x^T over all
    positions (only when a full-precision stream runs).

    The residual correction only ever needs W Hdelta. For a layer with fewer rows than columns (fc2:
    4x fewer) `delta_rows` accumulates that product directly from the layer's outputs,
    sum (W x_fp - W x) x^T, which the forward pass computed anyway: rows x columns per position instead
    of columns x columns."""

    columns: int
    device: torch.device | str = "cpu"
    with_delta: bool = False
    delta_rows: int | None = None
    Hc_upper: torch.Tensor = field(init=False, repr=False)
    Ht_upper: torch.Tensor = field(init=False, repr=False)
    Hdelta: torch.Tensor | None = field(init=False)
    WHdelta: torch.Tensor | None = field(init=False)
    n_common: int = 0
    n_tail: int = 0
    prompt_trace: float = 0.0  # sum |x|^2 over the common positions that read a prompt (special) token
    _mirrored: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        z = lambda rows: torch.zeros(rows, self.columns, dtype=torch.float32, device=self.device)  # noqa: E731
        self.Hc_upper, self.Ht_upper = z(self.columns), z(self.columns)
        by_output = self.with_delta and self.delta_rows is not None
        self.Hdelta = z(self.columns) if self.with_delta and not by_output else None
        self.WHdelta = z(self.delta_rows) if by_output else None

    def add(self, x: torch.Tensor, tail: torch.Tensor | None = None, x_fp: torch.Tensor | None = None,
            dy: torch.Tensor | None = None, prompt: torch.Tensor | None = None) -> None:
        """x, x_fp [positions, columns]; tail [positions] bool (None: all common); dy [positions, rows] the
        layer's output on x_fp minus its output on x. Drift tracked by input needs x_fp, by output
        (`delta_rows`) dy; the other is ignored. prompt [positions] bool: the positions that read a special
        token, whose common share of tr(H) `prompt_trace` keeps (for lambda_positions "text")."""
        x = x.reshape(-1, self.columns).float()
        if prompt is not None:
            common_prompt = prompt.reshape(-1) if tail is None else prompt.reshape(-1) & ~tail.reshape(-1)
            self.prompt_trace += float(x[common_prompt].pow(2).sum())
        if tail is None or not bool(tail.any()):
            # all common (GPTQ, and every encoder position by default): no masked copies of x
            xc, xt = x, x[:0]
        else:
            tail = tail.reshape(-1)
            xc, xt = x[~tail], x[tail]
        self._mirrored.clear()
        if xc.numel():
            accumulate_upper(self.Hc_upper, xc)
        if xt.numel():
            accumulate_upper(self.Ht_upper, xt)
        self.n_common += int(xc.shape[0])
        self.n_tail += int(xt.shape[0])
        if self.Hdelta is not None:
            if x_fp is None:
                raise ValueError("this layer tracks drift: pass x_fp with x")
            x_fp = x_fp.reshape(-1, self.columns).float()
            self.Hdelta.addmm_((x_fp - x).T, x)
        if self.WHdelta is not None:
            if dy is None:
                raise ValueError("this layer tracks drift through its outputs: pass dy with x")
            self.WHdelta.addmm_(dy.reshape(-1, self.WHdelta.shape[0]).float().T, x)

    @property
    def Hc(self) -> torch.Tensor:
        return self._mirror("Hc")

    @property
    def Ht(self) -> torch.Tensor:
        return self._mirror("Ht")

    @property
    def H(self) -> torch.Tensor:
        return self.Hc + self.Ht

    def _mirror(self, name: str) -> torch.Tensor:
        if name not in self._mirrored:
            self._mirrored[name] = mirror_upper(getattr(self, f"{name}_upper"))
        return self._mirrored[name]

    def w_hdelta(self, W: torch.Tensor) -> torch.Tensor:
        """W Hdelta, for the W whose outputs `dy` came from when accumulated by output."""
        if self.WHdelta is not None:
            if W.shape != self.WHdelta.shape:
                raise ValueError(f"drift was accumulated for W {tuple(self.WHdelta.shape)}, not {tuple(W.shape)}")
            return self.WHdelta
        if self.Hdelta is None:
            raise ValueError("no drift statistics: gathered without a full-precision stream")
        return W.float() @ self.Hdelta

    @property
    def prompt_share(self) -> float:
        """The prompt's (common) positions' share of the trace mass of H."""
        total = float(torch.trace(self.Hc_upper)) + float(torch.trace(self.Ht_upper))
        return self.prompt_trace / total if total > 0 else 0.0

    @property
    def tail_share(self) -> float:
        """The tail's share of the trace mass of H (the paper's p)."""
        tail = float(torch.trace(self.Ht_upper))
        total = float(torch.trace(self.Hc_upper)) + tail
        return tail / total if total > 0 else 0.0


def rarebal(stats: LayerStats, cost: float = 1.0, text_only: bool = False) -> tuple[torch.Tensor, float]:
    """H_rb = Hc + lambda Ht with lambda = cost * tr(Hc) / tr(Ht): equal trace mass for tail and common.
    `text_only` leaves the prompt positions' share (stats.prompt_trace) out of tr(Hc) in lambda (not out of
    Hc). A layer that saw no tail position keeps plain H (lambda reported as 1)."""
    tr_t = float(torch.trace(stats.Ht))
    if stats.n_tail == 0 or tr_t <= 0:
        return stats.H, 1.0
    tr_c = float(torch.trace(stats.Hc))
    if text_only and tr_c - stats.prompt_trace > 0:
        tr_c -= stats.prompt_trace
    lam = cost * tr_c / (tr_t + 1e-12 * max(tr_t, 1.0))
    return stats.Hc + lam * stats.Ht, lam


def drift_direction(W_Hdelta: torch.Tensor, H: torch.Tensor, damp: float,
                    prepared: Prepared | None = None) -> torch.Tensor:
    """D = W Hdelta (H + delta I)^-1: the least-squares fix W -> W + D that maps the drifted inputs x
    to the full-precision outputs W x_fp (exact when H is the unweighted sum x x^T and delta is 0).
    `prepared` (from `prepare(H, damp)`) reuses its Cholesky factor."""
    # Solve from the right through the symmetric system: D Hd = W Hdelta.
    if prepared is not None:
        return prepared.solve(W_Hdelta.T).T
    return torch.linalg.solve(damped(H, damp), W_Hdelta.T).T


def h_inner(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> float:
    """<A, B>_H = tr(A H B^T)."""
    return float(torch.einsum("ij,jk,ik->", A.float(), H, B.float()))


def residual_alpha(E: torch.Tensor, D: torch.Tensor, H: torch.Tensor) -> float:
    """alpha = <E, D>_H / (<D, D>_H + eps), eps relative to the scale of <D, D>_H."""
    return _step(h_inner(E, D, H), h_inner(D, D, H))


def _step(ed: float, dd: float) -> float:
    return ed / (dd + 1e-8 * abs(dd) + 1e-30)


@dataclass
class TarqSolve:
    result: GPTQResult
    lam: float
    alphas: list[float] | None  # one per row block of `splits`
    # per row block: |D|_H / |E|_H and cos(E, D) in the H metric; alpha = cos * |E|_H / |D|_H, so these
    # say whether a small alpha comes from a small drift or from a pilot error unrelated to it
    drift_ratios: list[float] | None
    cosines: list[float] | None
    H: torch.Tensor  # the metric the solves used (H_rb, or plain H)
    rtn_weight: torch.Tensor | None  # round-to-nearest on the same grid, for the report
    pilot_weight: torch.Tensor


def tarq_solve(W: torch.Tensor, stats: LayerStats, *, bits: int, group_size: int, sym: bool, damp: float,
               block_size: int = 128, act_order: bool = False, use_rarebal: bool = True,
               use_residual: bool = True, cost: float = 1.0, with_rtn: bool = True,
               splits: list[int] | None = None, full_step: bool = False, lambda_text_only: bool = False) -> TarqSolve:
    """Pilot GPTQ on H_rb, residual step alpha D, final GPTQ on W + alpha D (TARQ.md steps 2-3).

    W may stack several layers that read the same input (q/k/v): `splits` gives their row counts,
    and each layer gets its own alpha while both GPTQ passes run once over the stack. `full_step`
    replaces the paper's alpha by 1 (the least-squares target itself)."""

    H, lam = rarebal(stats, cost, lambda_text_only) if use_rarebal else (stats.H, 1.0)
    solve = dict(bits=bits, group_size=group_size, sym=sym, damp=damp, block_size=block_size,
                 act_order=act_order)
    # pilot and final solve against the same H: factor it once
    solve["prepared"] = prepare(H, damp, act_order)
    W = W.float()
    rtn_weight = rtn(W, bits, group_size, sym).dequantize() if with_rtn else None
    pilot = gptq(W, H, **solve)
    if not use_residual or not stats.with_delta:
        return TarqSolve(pilot, lam, None, None, None, H, rtn_weight, pilot.weight)
    D = drift_direction(stats.w_hdelta(W), H, damp, solve["prepared"])
    E = pilot.weight - W
    # per-row inner products in the H metric, from one product with H each; summed per layer below
    EH, DH = E @ H, D @ H
    ee_r, dd_r, ed_r = (EH * E).sum(1), (DH * D).sum(1), (EH * D).sum(1)
    alphas, ratios, cosines, target, start = [], [], [], W.clone(), 0
    for rows in splits or [W.shape[0]]:
        part = slice(start, start + rows)
        ee, dd, ed = float(ee_r[part].sum()), float(dd_r[part].sum()), float(ed_r[part].sum())
        ratios.append((dd / ee) ** 0.5 if ee > 0 else 0.0)
        cosines.append(ed / ((ee * dd) ** 0.5) if ee > 0 and dd > 0 else 0.0)
        alpha = 1.0 if full_step else _step(ed, dd)
        target[part] += alpha * D[part]
        alphas.append(alpha)
        start += rows
    # No drift (the first blocks: both streams still agree) leaves the target at W, and GPTQ is
    # deterministic: the final solve would repeat the pilot.
    final = pilot if torch.equal(target, W) else gptq(target, H, **solve)
    return TarqSolve(final, lam, alphas, ratios, cosines, H, rtn_weight, pilot.weight)
