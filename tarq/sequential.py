"""The sequential driver: quantize block after block on the inputs of the partially quantized network.

Two activation streams run side by side for TARQ's residual correction: `x` through the blocks
already quantized, `x_fp` through the full-precision ones. GPTQ runs `x` alone; RTN needs no data.
Peak memory is one model plus the streams of one block's inputs; in "layer" order also every batch's
activations inside the block while its forward waits for a group to be solved.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import QuantConfig
from .errors import Cancelled
from .gptq import row_energy
from .models import whisper
from .paused_forward import PausedForward, pauses_before
from .progress import Progress, ProgressFn, StopFn
from .quantizer import QuantizedWeight, rtn
from .rarebal import LayerStats, tarq_solve
from .transcribe import compute_dtype

if TYPE_CHECKING:
    from .calibrate import CalibData


class Driver:
    def __init__(self, model: nn.Module, config: QuantConfig, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None):
        self.model = model
        self.config = config
        self.progress = progress or (lambda p: None)
        self.should_stop = should_stop or (lambda: False)
        self.blocks = whisper.blocks(model)
        self.quantized: dict[str, QuantizedWeight] = {}
        self.layers: list[dict] = []
        self.stream_drift: list[dict] = []  # per block, |x - x_fp|^2 / |x_fp|^2 after it (two streams only)
        self.seconds: dict[str, float] = {}  # forward / statistics / solve
        self.encoder_batch: int | None = None  # clips per encoder block call (calibrated methods)
        device = next(model.parameters()).device
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        # what the block forward passes compute in (config.forward_dtype resolved for this device)
        self.forward_dtype = compute_dtype(config.forward_dtype, str(device))
        self.autocast = (lambda: torch.autocast(device.type, dtype=self.forward_dtype)) \
            if self.forward_dtype != torch.float32 else nullcontext
        self.two_streams = config.method == "tarq" and config.residual
        self.tagged = config.method == "tarq" and config.rarebal
        self.prompts: list[torch.Tensor] | None = None  # set while the decoder blocks run (prompt_of)

    def check_stop(self) -> None:
        if self.should_stop():
            raise Cancelled("quantization cancelled")

    # -- the whole run -------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, data: CalibData | None) -> dict[str, QuantizedWeight]:
        if self.config.method == "rtn":
            return self.run_rtn()
        if data is None:
            raise ValueError(f"{self.config.method} needs calibration data")
        self.run_calibrated(data)
        return self.quantized

    def run_rtn(self) -> dict[str, QuantizedWeight]:
        c = self.config
        for i, block in enumerate(self.blocks):
            self.check_stop()
            groups = block.groups + ((whisper.CROSS_KV,) if block.side == "decoder" else ())
            for group in groups:
                for name in group:
                    start = time.perf_counter()
                    lin = block.linear(name)
                    q = rtn(lin.weight.data, c.bits, c.group_size, c.sym)
                    self.set_weight(f"{block.prefix}.{name}", lin, q)
                    self.layers.append({"name": f"{block.prefix}.{name}", "seconds": time.perf_counter() - start})
            self.progress(Progress(block.side, i + 1, len(self.blocks)))
        return self.quantized

    def run_calibrated(self, data: CalibData) -> None:
        model = self.model
        split = lambda bs: [slice(i, min(i + bs, len(data))) for i in range(0, len(data), bs)]
        p = next(model.parameters())
        self.encoder_batch = whisper.encoder_batch_size(model.config, self.config.batch_size, p.device,
                                                        p.element_size())
        enc_batches, batches = split(self.encoder_batch), split(self.config.batch_size)
        enc_blocks = [b for b in self.blocks if b.side == "encoder"]
        dec_blocks = [b for b in self.blocks if b.side == "decoder"]

        x, kwargs = [], []
        for b in enc_batches:
            h, kw = whisper.encoder_inputs(model, data.features[b])
            x.append(h)
            kwargs.append(kw)
        # the same tensors until block 0 advances either stream: its first pass serves both
        x_fp = list(x) if self.two_streams else None
        frame_tail = [data.frame_tail[b] for b in enc_batches] if self.tagged else [None] * len(enc_batches)
        for i, block in enumerate(enc_blocks):
            self.check_stop()
            loss = self.quantize_block(block, x, x_fp, kwargs, kwargs, frame_tail, None)
            self.progress(Progress("encoder", i + 1, len(self.blocks), loss))

        enc_q = [whisper.encoder_output(model, h) for h in x]
        enc_fp = [whisper.encoder_output(model, h) for h in x_fp] if x_fp is not None else None
        del x, x_fp
        cross = LayerStats(enc_q[0].shape[-1], enc_q[0].device, with_delta=self.two_streams)
        for j in range(len(enc_batches)):
            self.add_stats(cross, enc_q[j], frame_tail[j], enc_fp[j] if enc_fp is not None else None, None)
        if enc_batches != batches:  # regroup into the decoder's batches
            enc_q = list(torch.cat(enc_q).split(self.config.batch_size))
            enc_fp = list(torch.cat(enc_fp).split(self.config.batch_size)) if enc_fp is not None else None

        x, kw_q, kw_fp = [], [], []
        for j, b in enumerate(batches):
            h, kw = whisper.decoder_inputs(model, data.input_ids[b], enc_q[j])
            x.append(h)
            kw_q.append({**kw, "encoder_hidden_states": enc_q[j]})
            if enc_fp is not None:
                kw_fp.append({**kw, "encoder_hidden_states": enc_fp[j]})
        x_fp = [h.clone() for h in x] if self.two_streams else None
        token_tail = [data.token_tail[b] for b in batches] if self.tagged else [None] * len(batches)
        # the prompt's positions: their share of each layer's trace goes into the report, and lambda_positions
        # "text" leaves it out of lambda
        self.prompts = [data.token_prompt[b] for b in batches] if self.tagged else None
        masks = [data.token_mask[b] for b in batches]
        for i, block in enumerate(dec_blocks):
            self.check_stop()
            loss = self.quantize_block(block, x, x_fp, kw_q, kw_fp, token_tail, masks, cross)
            self.progress(Progress("decoder", len(enc_blocks) + i + 1, len(self.blocks), loss))
        self.prompts = None

    # -- one block -----------------------------------------------------------------------------
    def quantize_block(self, block, x, x_fp, kw_q, kw_fp, tails, masks, cross: LayerStats | None = None) -> float:
        """Solve the block's groups and, in a decoder block, its cross-attention k/v from `cross`; x advances
        through the quantized block, x_fp through the full-precision one. Returns the mean relative loss
        of the groups (cross k/v not included)."""
        solve = self.quantize_block_layerwise if self.config.sequential == "layer" else self.quantize_block_at_once
        rel = solve(block, x, x_fp, kw_q, kw_fp, tails, masks, cross)
        if x_fp is not None:
            # how far the quantized network's hidden states have drifted from the full-precision ones:
            # the quantity the residual correction exists to keep small
            pick = _picker(masks)
            err = sum(float((pick(j, x[j]) - pick(j, x_fp[j])).float().pow(2).sum()) for j in range(len(x)))
            ref = sum(float(pick(j, x_fp[j]).float().pow(2).sum()) for j in range(len(x)))
            self.stream_drift.append({"block": block.prefix, "drift": err / max(ref, 1e-30)})
        return float(sum(rel) / len(rel))

    # -- timed steps: where a run's time goes, in tarq_report.json ("quantize_seconds") ----------------
    @contextmanager
    def timed(self, step: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start

    def forward(self, block, h: torch.Tensor, kw: dict) -> torch.Tensor:
        with self.timed("forward"), self.autocast():
            return block.module(h, **_call_args(kw))

    def resume(self, run: PausedForward) -> tuple[nn.Module, torch.Tensor] | None:
        # autocast is entered here, around the paused forward, never inside it (tarq.paused_forward)
        with self.timed("forward"), self.autocast():
            return run.resume()

    def add_stats(self, st: LayerStats, x, tail, x_fp, dy, prompt=None) -> None:
        with self.timed("statistics"):
            st.add(x, tail, x_fp, dy, prompt)

    def prompt_of(self, j: int, pick):
        """Batch j's prompt positions while decoder blocks are solved with tags, else None."""
        return pick(j, self.prompts[j]) if self.prompts is not None else None

    def drift_by_output(self, block, group: tuple[str, ...]) -> bool:
        """A single layer with at most half as many rows as columns (fc2) tracks drift through its outputs."""
        lin = block.linear(group[0])
        return self.two_streams and len(group) == 1 and 2 * lin.out_features <= lin.in_features

    def new_stats(self, block, group: tuple[str, ...], device) -> LayerStats:
        lin = block.linear(group[0])
        return LayerStats(lin.in_features, device, with_delta=self.two_streams,
                          delta_rows=lin.out_features if self.drift_by_output(block, group) else None)

    def quantize_block_at_once(self, block, x, x_fp, kw_q, kw_fp, tails, masks, cross) -> list[float]:
        """Gather every group's statistics on both streams in one pass (x_fp advancing through the
        full-precision block), solve the groups and cross-attention k/v, then advance x through the
        quantized block: two passes per block, three with x_fp."""
        groups = block.groups
        stats = [self.new_stats(block, g, x[0].device) for g in groups]
        pick = _picker(masks)
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with capture_io([block.linear(g[0]) for g in groups], seen):
            for j in range(len(x)):
                self.check_stop()
                cap_fp = None
                same = x_fp is not None and x_fp[j] is x[j] and kw_fp[j] is kw_q[j]
                if x_fp is not None:
                    seen.clear()
                    x_fp[j] = self.forward(block, x_fp[j], kw_fp[j])
                    cap_fp = dict(seen)
                if not same:
                    seen.clear()
                    self.forward(block, x[j], kw_q[j])
                tail = pick(j, tails[j]) if tails[j] is not None else None
                for k, st in enumerate(stats):
                    (xin, y), fp = seen[k], (cap_fp[k] if cap_fp is not None else None)
                    self.add_stats(st, pick(j, xin), tail, None if fp is None else pick(j, fp[0]),
                                   pick(j, fp[1]) - pick(j, y) if st.WHdelta is not None else None,
                                   self.prompt_of(j, pick))
        rel = [self.solve_group(block, g, st) for g, st in zip(groups, stats)]
        if cross is not None:
            self.solve_group(block, whisper.CROSS_KV, cross)
        for j in range(len(x)):
            x[j] = self.forward(block, x[j], kw_q[j])
        return rel

    def quantize_block_layerwise(self, block, x, x_fp, kw_q, kw_fp, tails, masks, cross) -> list[float]:
        """Solve the groups in block order, each on x-stream inputs that went through the groups before
        it already quantized, in one pass per stream: every batch's forward on each stream runs as a
        PausedForward that stops before each group's first Linear. When all of them stand before group k,
        its statistics are gathered, the full-precision forwards go on through it (still full precision)
        to the next group, the group is solved, and then the x forwards go on through the quantized group.
        A decoder block's cross-attention k/v take their place in that order with the statistics `cross`
        gathered from the encoder output."""
        order = whisper.DECODER_CALL_ORDER if block.side == "decoder" else block.groups
        linears = [block.linear(g[0]) for g in order]
        pick = _picker(masks)
        start = lambda h, kw: PausedForward(lambda: block.module(h, **_call_args(kw)))  # noqa: E731
        runs = [start(x[j], kw_q[j]) for j in range(len(x))]
        runs_fp = [start(x_fp[j], kw_fp[j]) for j in range(len(x))] if x_fp is not None else []
        rel = []
        try:
            with pauses_before(linears):
                at_fp = [self.resume(r) for r in runs_fp]
                for k, group in enumerate(order):
                    given = cross if group == whisper.CROSS_KV else None
                    st = given if given is not None else self.new_stats(block, group, x[0].device)
                    for j, run in enumerate(runs):
                        self.check_stop()
                        xin = _paused_at(self.resume(run), linears[k], block.prefix, group[0])
                        fp = _paused_at(at_fp[j], linears[k], block.prefix, group[0]) if runs_fp else None
                        if given is None:
                            self.add_group_stats(st, linears[k], pick(j, xin), None if fp is None else pick(j, fp),
                                                 pick(j, tails[j]) if tails[j] is not None else None,
                                                 self.prompt_of(j, pick))
                        if runs_fp:  # on through group k while it is still full precision
                            at_fp[j] = self.resume(runs_fp[j])
                    loss = self.solve_group(block, group, st)
                    if given is None:
                        rel.append(loss)
                for run in runs:  # on through the last, now quantized, group to the block's output
                    if self.resume(run) is not None:
                        raise RuntimeError(f"{block.prefix} called a grouped Linear after its last group")
        finally:
            for run in runs + runs_fp:
                run.close()
        x[:] = [run.output for run in runs]
        if x_fp is not None:
            x_fp[:] = [run.output for run in runs_fp]
        return rel

    def add_group_stats(self, st: LayerStats, lin: nn.Linear, xin, fp, tail, prompt=None) -> None:
        dy = None
        if st.WHdelta is not None:  # drift by output: W x_fp - W x, with W still full precision
            with self.timed("statistics"):
                dy = (fp.float() - xin.float()) @ lin.weight.float().T
        self.add_stats(st, xin, tail, fp, dy, prompt)

    def solve_group(self, block, group: tuple[str, ...], stats: LayerStats) -> float:
        """Solve the layers of one group together; record each layer's quantized weight and report row."""
        c = self.config
        start = time.perf_counter()
        lins = [block.linear(n) for n in group]
        W = torch.cat([lin.weight.data.float() for lin in lins])
        with self.timed("solve"):
            solved = tarq_solve(
                W, stats, bits=c.bits, group_size=c.group_size, sym=c.sym, damp=c.damp, block_size=c.block_size,
                act_order=c.act_order, use_rarebal=self.tagged, use_residual=self.two_streams,
                cost=c.lambda_cost, splits=[lin.out_features for lin in lins], full_step=c.residual_step == "full",
                lambda_text_only=c.lambda_positions == "text")
        H = solved.H
        seconds = (time.perf_counter() - start) / len(lins)
        # relative errors |(W - Q) X|^2 / |W X|^2 in the metric of the solve, row by row so that each
        # layer of the group and the group as a whole read their share from one product with H each
        energy = row_energy(W, H)
        h_rank = float(torch.trace(H)) ** 2 / max(float((H * H).sum()), 1e-30)
        errors = {k: row_energy(W - Q, H) for k, Q in
                  (("rtn", solved.rtn_weight), ("pilot", solved.pilot_weight), ("final", solved.result.weight))}
        rel = lambda e, rows: float(e[rows].sum()) / max(float(energy[rows].sum()), 1e-30)  # noqa: E731
        row = 0
        for k, (name, lin) in enumerate(zip(group, lins)):
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            full = f"{block.prefix}.{name}"
            self.set_weight(full, lin, solved.result.quant.rows(rows.start, rows.stop))
            self.layers.append({
                "name": full,
                "rows": lin.out_features,
                "columns": lin.in_features,
                "lambda": solved.lam,
                "alpha": solved.alphas[k] if solved.alphas else None,
                "drift_ratio": solved.drift_ratios[k] if solved.drift_ratios else None,
                "drift_cosine": solved.cosines[k] if solved.cosines else None,
                "tail_share": stats.tail_share,
                "prompt_share": stats.prompt_share if self.prompts is not None else None,
                "positions": stats.n_common + stats.n_tail,
                "tail_positions": stats.n_tail,
                # tr(H)^2 / tr(H^2): how many input directions carry the activations; two unrelated weight
                # displacements have an H-cosine of about 1 / sqrt(rows * this)
                "h_effective_rank": h_rank,
                "loss_rtn": rel(errors["rtn"], rows),
                "loss_pilot": rel(errors["pilot"], rows),
                "loss_final": rel(errors["final"], rows),
                "solved_with": list(group) if len(lins) > 1 else None,
                "seconds": seconds,
            })
        return rel(errors["final"], slice(None))

    def set_weight(self, name: str, lin: nn.Linear, q: QuantizedWeight) -> None:
        self.quantized[name] = q
        lin.weight.data = q.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)


def _call_args(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "hidden_states"}


def _picker(masks):
    """Batch j's calibration positions of a [B, T, ...] tensor: the unpadded tokens on the decoder
    (masks), every frame on the encoder."""
    if masks is None:
        return lambda j, t: t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t.reshape(-1)
    return lambda j, t: t[masks[j]]


def _paused_at(at: tuple[nn.Module, torch.Tensor] | None, expected: nn.Module, prefix: str, name: str) -> torch.Tensor:
    """The input a paused forward stands with, checked to be the Linear the group order expects next."""
    if at is None or at[0] is not expected:
        raise RuntimeError(f"{prefix}: the forward did not reach {name} where its group order puts it")
    return at[1]


@contextmanager
def capture_io(linears: list[nn.Linear], seen: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """While active, seen[k] holds the last (input, output) of linears[k]."""
    handles = [lin.register_forward_hook(lambda _m, args, out, k=k: seen.__setitem__(k, (args[0], out)))
               for k, lin in enumerate(linears)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
