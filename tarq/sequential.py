"""The sequential driver: quantize block after block on the inputs of the partially quantized network.

Two activation streams run side by side for TARQ's residual correction: `x` through the blocks
already quantized, `x_fp` through the full-precision ones. GPTQ runs `x` alone; RTN needs no data.
Peak memory is one model plus the streams of one block's inputs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import QuantConfig
from .errors import Cancelled
from .gptq import h_loss
from .models import whisper
from .progress import Progress, ProgressFn, StopFn
from .quantizer import QuantizedWeight, rtn
from .rarebal import LayerStats, tarq_solve

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
        self.two_streams = config.method == "tarq" and config.residual
        self.tagged = config.method == "tarq" and config.rarebal

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
        model, bs = self.model, self.config.batch_size
        batches = [slice(i, min(i + bs, len(data))) for i in range(0, len(data), bs)]
        enc_blocks = [b for b in self.blocks if b.side == "encoder"]
        dec_blocks = [b for b in self.blocks if b.side == "decoder"]

        x, kwargs = [], []
        for b in batches:
            h, kw = whisper.encoder_inputs(model, data.features[b])
            x.append(h)
            kwargs.append(kw)
        x_fp = [h.clone() for h in x] if self.two_streams else None
        frame_tail = [data.frame_tail[b] for b in batches] if self.tagged else [None] * len(batches)
        for i, block in enumerate(enc_blocks):
            self.check_stop()
            loss = self.quantize_block(block, x, x_fp, kwargs, kwargs, frame_tail, None)
            self.progress(Progress("encoder", i + 1, len(self.blocks), loss))

        enc_q = [whisper.encoder_output(model, h) for h in x]
        enc_fp = [whisper.encoder_output(model, h) for h in x_fp] if x_fp is not None else None
        del x, x_fp
        cross = LayerStats(enc_q[0].shape[-1], enc_q[0].device, with_delta=self.two_streams)
        for j in range(len(batches)):
            cross.add(enc_q[j], frame_tail[j], enc_fp[j] if enc_fp is not None else None)

        x, kw_q, kw_fp = [], [], []
        for j, b in enumerate(batches):
            h, kw = whisper.decoder_inputs(model, data.input_ids[b], enc_q[j])
            x.append(h)
            kw_q.append({**kw, "encoder_hidden_states": enc_q[j]})
            if enc_fp is not None:
                kw_fp.append({**kw, "encoder_hidden_states": enc_fp[j]})
        x_fp = [h.clone() for h in x] if self.two_streams else None
        token_tail = [data.token_tail[b] for b in batches] if self.tagged else [None] * len(batches)
        masks = [data.token_mask[b] for b in batches]
        for i, block in enumerate(dec_blocks):
            self.check_stop()
            loss = self.quantize_block(block, x, x_fp, kw_q, kw_fp, token_tail, masks)
            self.solve_group(block, whisper.CROSS_KV, cross)
            self.progress(Progress("decoder", len(enc_blocks) + i + 1, len(self.blocks), loss))

    # -- one block -----------------------------------------------------------------------------
    def quantize_block(self, block, x, x_fp, kw_q, kw_fp, tails, masks) -> float:
        """Gather every group's statistics on both streams, solve the groups, then advance the streams:
        x through the quantized block, x_fp through the full-precision one (computed before solving)."""
        groups = block.groups
        stats = [LayerStats(block.linear(g[0]).in_features, x[0].device, with_delta=self.two_streams)
                 for g in groups]
        seen: dict[int, torch.Tensor] = {}
        with capture_inputs([block.linear(g[0]) for g in groups], seen):
            for j in range(len(x)):
                self.check_stop()
                pick = (lambda t: t[masks[j]]) if masks is not None else (lambda t: t.reshape(-1, t.shape[-1]))
                cap_fp = None
                if x_fp is not None:
                    seen.clear()
                    x_fp[j] = block.module(x_fp[j], **_call_args(kw_fp[j]))
                    cap_fp = dict(seen)
                seen.clear()
                block.module(x[j], **_call_args(kw_q[j]))
                tail = pick(tails[j]) if tails[j] is not None else None
                for k, st in enumerate(stats):
                    st.add(pick(seen[k]), tail, pick(cap_fp[k]) if cap_fp is not None else None)
        rel = [self.solve_group(block, g, st) for g, st in zip(groups, stats)]
        del stats
        for j in range(len(x)):
            x[j] = block.module(x[j], **_call_args(kw_q[j]))
        return float(sum(rel) / len(rel))

    def solve_group(self, block, group: tuple[str, ...], stats: LayerStats) -> float:
        """Solve the layers of one group together; record each layer's quantized weight and report row."""
        c = self.config
        start = time.perf_counter()
        lins = [block.linear(n) for n in group]
        W = torch.cat([lin.weight.data.float() for lin in lins])
        solved = tarq_solve(
            W, stats, bits=c.bits, group_size=c.group_size, sym=c.sym, damp=c.damp, block_size=c.block_size,
            act_order=c.act_order, use_rarebal=self.tagged, use_residual=self.two_streams,
            cost=c.lambda_cost, splits=[lin.out_features for lin in lins], full_step=c.residual_step == "full")
        H = solved.H
        seconds = (time.perf_counter() - start) / len(lins)
        rel = lambda A, B: h_loss(A, B, H) / max(h_loss(A, torch.zeros_like(A), H), 1e-30)  # noqa: E731
        row = 0
        for k, (name, lin) in enumerate(zip(group, lins)):
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            full = f"{block.prefix}.{name}"
            self.set_weight(full, lin, solved.result.quant.rows(rows.start, rows.stop))
            Wk = W[rows]
            self.layers.append({
                "name": full,
                "lambda": solved.lam,
                "alpha": solved.alphas[k] if solved.alphas else None,
                "drift_ratio": solved.drift_ratios[k] if solved.drift_ratios else None,
                "drift_cosine": solved.cosines[k] if solved.cosines else None,
                "tail_share": stats.tail_share,
                "positions": stats.n_common + stats.n_tail,
                "tail_positions": stats.n_tail,
                # relative errors |(W - Q) X|^2 / |W X|^2 in the metric of the solve, before and after
                "loss_rtn": rel(Wk, solved.rtn_weight[rows]),
                "loss_pilot": rel(Wk, solved.pilot_weight[rows]),
                "loss_final": rel(Wk, solved.result.weight[rows]),
                "solved_with": list(group) if len(lins) > 1 else None,
                "seconds": seconds,
            })
        return rel(W, solved.result.weight)

    def set_weight(self, name: str, lin: nn.Linear, q: QuantizedWeight) -> None:
        self.quantized[name] = q
        lin.weight.data = q.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)


def _call_args(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "hidden_states"}


@contextmanager
def capture_inputs(linears: list[nn.Linear], seen: dict[int, torch.Tensor]):
    """While active, seen[k] holds the last input of linears[k]."""
    handles = [lin.register_forward_pre_hook(lambda _m, args, k=k: seen.__setitem__(k, args[0]))
               for k, lin in enumerate(linears)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
