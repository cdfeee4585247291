"""Whisper as data for the sequential driver: which blocks, which Linear layers in which groups,
and how a block is called on each activation stream.

Layers in one group read the same input and are solved together (rows stacked under one Hessian).
Cross-attention k/v read the encoder output, the same for every decoder block, so their statistics are
gathered once and shared.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

ENCODER_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("fc1",),
    ("fc2",),
)
DECODER_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("encoder_attn.q_proj",),
    ("encoder_attn.out_proj",),
    ("fc1",),
    ("fc2",),
)
CROSS_KV: tuple[str, ...] = ("encoder_attn.k_proj", "encoder_attn.v_proj")
# The order a decoder block's forward calls the first Linear of each group, cross-attention k/v included
# (after their query)
DECODER_CALL_ORDER: tuple[tuple[str, ...], ...] = DECODER_GROUPS[:3] + (CROSS_KV,) + DECODER_GROUPS[3:]

# glibc serves every allocation above its largest mmap threshold (32 MiB on 64-bit) with a fresh mmap that
# the kernel zero-fills page by page on first touch, on every call. A whisper-base encoder batch of 8 clips
# makes 98 MB fc1 activations, and the elementwise ops on them (gelu, copies) then cost 5-10x their
# in-heap time, so on CPU the encoder runs (calibration, batched transcription) in batches whose largest
# activation stays under the threshold.
HEAP_ALLOC_MAX = 32 << 20


def encoder_batch_size(cfg, batch_size: int, device: torch.device, itemsize: int) -> int:
    """Clips per encoder call: `batch_size` on accelerators; on CPU at most as many clips as keep
    the widest activation (fc1's output, `itemsize` bytes per value) under HEAP_ALLOC_MAX."""
    if device.type != "cpu":
        return batch_size
    return max(1, min(batch_size, HEAP_ALLOC_MAX // widest_encoder_activation(cfg, itemsize)))


def widest_encoder_activation(cfg, itemsize: int) -> int:
    """Bytes of one clip's widest encoder activation (fc1's output)."""
    return cfg.max_source_positions * max(cfg.encoder_ffn_dim, cfg.d_model) * itemsize


def encode(model: nn.Module, features: torch.Tensor):
    """The encoder's output for a batch of features, run in `encoder_batch_size` chunks; `generate` takes
    it as `encoder_outputs` and then skips the encoder."""
    from transformers.modeling_outputs import BaseModelOutput

    encoder = model.get_encoder()
    n = encoder_batch_size(model.config, len(features), features.device, features.element_size())
    return BaseModelOutput(last_hidden_state=torch.cat([encoder(c).last_hidden_state for c in features.split(n)]))


@dataclass(frozen=True)
class Block:
    prefix: str  # e.g. "model.encoder.layers.3"
    module: nn.Module
    side: str  # "encoder" | "decoder"

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return ENCODER_GROUPS if self.side == "encoder" else DECODER_GROUPS

    def linear(self, name: str) -> nn.Linear:
        return self.module.get_submodule(name)


def blocks(model: nn.Module) -> list[Block]:
    enc = model.model.encoder.layers
    dec = model.model.decoder.layers
    return ([Block(f"model.encoder.layers.{i}", m, "encoder") for i, m in enumerate(enc)]
            + [Block(f"model.decoder.layers.{i}", m, "decoder") for i, m in enumerate(dec)])


def quantizable_names(model: nn.Module) -> list[str]:
    """Every Linear TARQ quantizes, in the order the driver visits them."""
    names = []
    for block in blocks(model):
        groups = block.groups + ((CROSS_KV,) if block.side == "decoder" else ())
        names += [f"{block.prefix}.{n}" for g in groups for n in g]
    return names


class _Captured(Exception):
    pass


def capture_block_inputs(run, block: nn.Module) -> dict:
    """Call `run()` (a forward of the encoder or decoder) and stop at `block`, returning the arguments
    the block was called with, bound by name; the rest of the model does not run."""
    seen: dict = {}
    sig = inspect.signature(block.forward)

    def hook(_module, args, kwargs):
        seen.update(sig.bind(*args, **kwargs).arguments)
        extra = seen.pop("kwargs", None)
        if extra:
            seen.update(extra)
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(block).__name__} was never called")
    return seen


def encoder_inputs(model: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering encoder block 0 [B, frames, d] and the other arguments of that call."""
    encoder = model.model.encoder
    args = capture_block_inputs(lambda: encoder(features), encoder.layers[0])
    return args.pop("hidden_states"), args


def decoder_inputs(model: nn.Module, input_ids: torch.Tensor, encoder_out: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder block 0 [B, tokens, d] and the other arguments of that call.
    Right padding needs no mask: causal attention keeps padding out of every real position."""
    decoder = model.model.decoder
    args = capture_block_inputs(
        lambda: decoder(input_ids=input_ids, encoder_hidden_states=encoder_out, use_cache=False),
        decoder.layers[0])
    args.pop("encoder_hidden_states", None)
    return args.pop("hidden_states"), args


def is_multilingual(model) -> bool:
    """Multilingual checkpoints take language/task prompts; English-only ones refuse them."""
    gc = model.generation_config
    if getattr(gc, "is_multilingual", None) is not None:
        return bool(gc.is_multilingual)
    return bool(getattr(gc, "lang_to_id", None))


def encoder_output(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What cross-attention reads: the last block's output through the final layer norm."""
    return model.model.encoder.layer_norm(hidden)
