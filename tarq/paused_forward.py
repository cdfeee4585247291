"""Forward passes that stop before chosen Linear layers and go on later, for GPTQ's "true sequential" order.

Solving a block group by group on the inputs its already quantized groups produce needs every
calibration batch to stand before group k while group k is solved, then to go on through the quantized
group. Re-running the block from its input for each group costs about one more pass per block; a
paused forward costs none. Each batch's forward runs in a greenlet (a coroutine on the same thread,
so one runs at a time and torch's intra-op threads are not oversubscribed); a pre-hook on each chosen
Linear hands its input to the caller and waits there.

torch keeps grad mode and autocast per thread, and greenlets share the thread: code run inside a paused
forward must not enter such contexts itself, or the caller would run under them while it waits. The
caller enters them around each `resume` instead (Driver does).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from greenlet import GreenletExit, getcurrent, greenlet
from torch import nn


class _Forward(greenlet):
    """The greenlet of a PausedForward: only these pause (a caller may itself run in a greenlet, e.g.
    under gevent)."""


class PausedForward:
    """`run()` as a coroutine: `resume` runs it on to the next paused Linear or to its end."""

    def __init__(self, run: Callable[[], torch.Tensor]):
        self._glet = _Forward(run)
        self.output: torch.Tensor | None = None

    def resume(self) -> tuple[nn.Module, torch.Tensor] | None:
        """(the Linear it stopped before, that Linear's input), or None once `run()` has returned (its
        result in `output`). An exception inside `run()` is raised here."""
        if self._glet.dead:
            raise RuntimeError("this forward has already finished")
        self._glet.parent = getcurrent()  # a pause comes back to whoever resumed it
        got = self._glet.switch()
        if self._glet.dead:
            self.output = got
            return None
        return got

    def close(self) -> None:
        """End a forward left paused (a cancel, an error elsewhere): its frames and tensors go now."""
        if self._glet:  # started and not finished
            self._glet.throw(GreenletExit)


def _pause(module: nn.Module, args: tuple) -> None:
    here = getcurrent()
    if isinstance(here, _Forward):  # elsewhere (a plain call): run through
        here.parent.switch((module, args[0]))


@contextmanager
def pauses_before(linears: list[nn.Module]) -> Iterator[None]:
    """While active, every PausedForward stops before each of `linears` runs."""
    handles = [lin.register_forward_pre_hook(_pause) for lin in linears]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
