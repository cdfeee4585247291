"""The fast GPTQ column sweep in tarq.gptq against a plain copy of the textbook loop it replaced.

`reference_gptq` below is the solver as it stood before the sweep was rewritten for speed (one column
at a time on [rows, cols] slices, fresh tensors per op); the rewrite must give the same weights, codes,
scales and zeros on every kind of problem, including act-order and symmetric grids.
"""
import pytest
import torch

from tarq.gptq import damped, gptq
from tarq.quantizer import QuantizedWeight, dequantize, find_params, quantize


def reference_gptq(W, H, *, bits=4, group_size=128, sym=False, damp=0.01, block_size=128, act_order=False):
    rows, cols = W.shape
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
    block = max(block_size // group_size, 1) * group_size
    n_groups = cols // group_size
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups)
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
    g_idx = torch.arange(cols, dtype=torch.int32) // group_size
    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes, g_idx = Q[:, inv], codes[:, inv], g_idx[inv]
    return Q, QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.int32), g_idx.to(torch.int32),
                              bits, group_size, sym)


def random_problem(rows, cols, seed, uneven=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g)
    X = X @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5)
    if uneven:  # very uneven column importance: act-order permutes heavily
        X = X * torch.linspace(0.1, 10, cols)[torch.randperm(cols, generator=g)]
    return W, X.T @ X


CASES = [
    dict(rows=16, cols=256),
    dict(rows=48, cols=384, sym=True),
    dict(rows=24, cols=256, act_order=True, uneven=True),
    dict(rows=24, cols=384, act_order=True, sym=True, uneven=True),
    dict(rows=8, cols=512, group_size=64, block_size=128),  # two groups per block
    dict(rows=8, cols=256, group_size=128, block_size=32),  # block rounded up to one group
    dict(rows=32, cols=256, bits=3),
    dict(rows=16, cols=256, dead=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_sweep_matches_the_textbook_loop(case, seed):
    case = dict(case)
    rows, cols, uneven, dead = case.pop("rows"), case.pop("cols"), case.pop("uneven", False), case.pop("dead", False)
    W, H = random_problem(rows, cols, seed, uneven)
    if dead:
        H[:, 7] = 0
        H[7, :] = 0
    ref_q, ref = reference_gptq(W, H, **case)
    new = gptq(W, H, **case)
    assert (new.weight - ref_q).abs().max() < 1e-5
    assert torch.equal(new.quant.codes, ref.codes)
    assert torch.allclose(new.quant.scale, ref.scale, rtol=0, atol=1e-7)
    assert torch.equal(new.quant.zero, ref.zero)
    assert torch.equal(new.quant.g_idx, ref.g_idx)
    assert new.weight.dtype == torch.float32 and new.quant.scale.dtype == torch.float32


def test_inputs_are_left_alone():
    W, H = random_problem(8, 256, 0)
    W0, H0 = W.clone(), H.clone()
    gptq(W, H, act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_results_are_ordinary_tensors():
    """The sweep runs in inference mode; what comes out must still accept in-place edits and autograd use."""
    W, H = random_problem(8, 256, 0)
    r = gptq(W, H, act_order=True)
    for t in (r.weight, r.quant.codes, r.quant.scale, r.quant.zero, r.quant.g_idx):
        assert not t.is_inference()
    r.weight.add_(0)


@pytest.mark.parametrize("act_order", [False, True])
def test_prepared_h_gives_the_same_solve(act_order):
    """TARQ solves twice against one H: factorizing it once must not change either answer."""
    from tarq.gptq import prepare

    W, H = random_problem(16, 256, 2, uneven=True)
    prep = prepare(H, 0.01, act_order)
    for target in (W, W + 0.01 * torch.randn_like(W)):
        ref_q, ref = reference_gptq(target, H, act_order=act_order)
        new = gptq(target, H, act_order=act_order, prepared=prep)
        assert torch.equal(new.weight, ref_q) and torch.equal(new.quant.codes, ref.codes)


def test_prepared_h_must_match_the_solve():
    from tarq.gptq import prepare

    W, H = random_problem(8, 256, 0)
    with pytest.raises(ValueError, match="act_order"):
        gptq(W, H, act_order=True, prepared=prepare(H, 0.01, act_order=False))
    with pytest.raises(ValueError, match="damp"):
        gptq(W, H, damp=0.1, prepared=prepare(H, 0.01))
