"""PausedForward: a forward that stops before chosen Linear layers, hands over their inputs and goes on
through whatever weights they hold when it is resumed."""
import gc
import weakref

import pytest
import torch
from torch import nn

from tarq.paused_forward import PausedForward, pauses_before


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


def test_stops_before_each_chosen_linear_and_reads_weights_changed_while_paused():
    net, x = toy(), torch.randn(5, 8)
    first, second = net[0], net[2]
    runs = [PausedForward(lambda: net(x)) for _ in range(2)]
    with pauses_before([first, second]):
        for run in runs:
            module, xin = run.resume()
            assert module is first and torch.equal(xin, x)
        for run in runs:
            module, xin = run.resume()
            assert module is second and torch.equal(xin, net[1](net[0](x)))
        # while both stand before the second layer, it changes; both go on through the new weight
        new = torch.randn_like(second.weight)
        second.weight.data = new
        outs = []
        for run in runs:
            assert run.resume() is None
            outs.append(run.output)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], net(x))  # the hooks are gone: a plain call, and it uses the new weight too
    assert torch.equal(net[2].weight, new)
    with pytest.raises(RuntimeError, match="already finished"):
        runs[0].resume()


def test_a_call_outside_any_paused_forward_runs_through():
    net, x = toy(), torch.randn(3, 8)
    with pauses_before([net[0], net[2]]):
        assert torch.equal(net(x), toy()(x))


def test_an_error_inside_the_forward_is_raised_by_resume():
    net = toy()
    run = PausedForward(lambda: net(torch.randn(3, 7)))  # 7 columns for a layer of 8
    with pauses_before([net[2]]), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run.resume()


def test_close_ends_a_paused_forward_and_frees_what_it_holds():
    net = toy()
    finished = []

    def forward():
        try:
            return net(torch.randn(1000, 8))
        finally:
            finished.append(True)  # reached when close() unwinds the paused frames

    run = PausedForward(forward)
    with pauses_before([net[2]]):
        module, xin = run.resume()
    held = weakref.ref(xin)  # the activation the paused frames hold
    del xin
    gc.collect()
    assert held() is not None
    run.close()
    gc.collect()
    assert finished == [True] and held() is None
    with pytest.raises(RuntimeError, match="already finished"):
        run.resume()


def test_works_when_the_caller_itself_runs_in_a_greenlet():
    """Under a greenlet-based worker pool the driver is not the main greenlet: pauses still come back to
    the caller, and the caller's own calls of a paused Linear run through."""
    from greenlet import greenlet

    net, x = toy(), torch.randn(2, 8)

    def caller():
        run = PausedForward(lambda: net(x))
        with pauses_before([net[2]]):
            module, xin = run.resume()
            direct = net(x)  # the caller's own call: no pause
            assert run.resume() is None
        return module is net[2], torch.equal(xin, net[1](net[0](x))), torch.equal(direct, run.output)

    assert greenlet(caller).switch() == (True, True, True)
