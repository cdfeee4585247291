"""The GPTQ solver on hand-made problems whose right answer is known."""
import pytest
import torch

from tarq.gptq import accumulate, accumulate_upper, gptq, h_loss, mirror_upper
from tarq.quantizer import find_params, rtn


def problem(rows=16, cols=256, n=2048, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(n, cols, generator=g)
    if correlated:  # real activations are correlated across channels; that is where GPTQ gains
        X = X @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5)
    H = torch.zeros(cols, cols)
    accumulate(H, X)
    return W, X, H


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_never_worse_than_rtn_in_h_metric(sym, bits):
    for seed in range(3):
        W, _, H = problem(seed=seed)
        q = gptq(W, H, bits=bits, group_size=128, sym=sym)
        r = rtn(W, bits, 128, sym).dequantize()
        assert h_loss(W, q.weight, H) < h_loss(W, r, H)


def test_h_loss_is_the_output_error():
    W, X, H = problem(n=512)
    Q = W + 0.01 * torch.randn_like(W)
    direct = float(((X @ (W - Q).T) ** 2).sum())
    assert h_loss(W, Q, H) == pytest.approx(direct, rel=1e-4)


def test_exact_at_high_bits():
    W, _, H = problem()
    q = gptq(W, H, bits=8, group_size=128, sym=False)
    # 8-bit steps are range/255: every weight lands within a fraction of a step of the original
    assert (q.weight - W).abs().max() < 0.05
    assert h_loss(W, q.weight, H) < 1e-3 * h_loss(W, torch.zeros_like(W), H)


def test_weights_on_the_grid_and_codes_consistent():
    W, _, H = problem()
    q = gptq(W, H, bits=4, group_size=128, sym=False)
    assert q.quant.codes.dtype == torch.uint8 and int(q.quant.codes.max()) <= 15
    assert torch.allclose(q.quant.dequantize(), q.weight, atol=1e-6)
    assert q.quant.scale.shape == (16, 2)


def test_symmetric_zero_is_midpoint():
    W, _, H = problem()
    q = gptq(W, H, bits=4, group_size=128, sym=True)
    assert (q.quant.zero == 8).all()


def test_act_order_inverse_permutation():
    W, _, H = problem(seed=3)
    # make column importance very uneven so act-order permutes heavily
    scale = torch.linspace(0.1, 10, W.shape[1])[torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(1))]
    H = H * scale[:, None] * scale[None, :]
    q = gptq(W, H, bits=4, group_size=128, act_order=True)
    # the returned weight is in the original column order: it must equal the dequantized codes
    assert torch.allclose(q.quant.dequantize(), q.weight, atol=1e-6)
    assert sorted(torch.bincount(q.quant.g_idx.long()).tolist()) == [128, 128]
    assert not torch.equal(q.quant.g_idx, torch.arange(256, dtype=torch.int32) // 128)
    plain = gptq(W, H, bits=4, group_size=128)
    # unpermuting wrongly would scatter the error; a right one is as good as or better than no act-order
    assert h_loss(W, q.weight, H) < 1.5 * h_loss(W, plain.weight, H)
    assert h_loss(W, q.weight, H) < h_loss(W, rtn(W, 4, 128, False).dequantize(), H)


def test_dead_columns_are_zeroed():
    W, _, H = problem()
    H[:, 5] = 0
    H[5, :] = 0
    q = gptq(W, H, bits=4, group_size=128)
    assert torch.isfinite(q.weight).all()
    assert q.weight[:, 5].abs().max() < 1e-6 + q.quant.scale[:, 0].max()


def test_rows_solve_independently():
    """Stacking layers that share H (q/k/v) gives each the same answer as solving it alone."""
    W, _, H = problem(rows=24)
    together = gptq(W, H, bits=4, group_size=128).weight
    alone = torch.cat([gptq(W[i:i + 8], H, bits=4, group_size=128).weight for i in (0, 8, 16)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_find_params_mse_never_worse():
    w = torch.randn(32, 128)
    w[:, 0] = 20  # an outlier stretches the min-max range

    def err(mse):
        s, z = find_params(w, 4, False, mse=mse)
        q = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 15) - z[:, None]) * s[:, None]
        return (q - w).abs().pow(2.4).sum()

    assert err(True) <= err(False) + 1e-3


def test_group_size_must_divide_columns():
    W, _, H = problem(cols=256)
    with pytest.raises(ValueError, match="multiple of group size"):
        gptq(W[:, :200], H[:200, :200], group_size=128)


@pytest.mark.parametrize("cols", [64, 512, 1100, 2048])
def test_upper_accumulation_mirrors_to_the_full_hessian(cols):
    """Stripes (uneven ones too: 1100 columns) cover the upper triangle; the mirror is x^T x."""
    g = torch.Generator().manual_seed(cols)
    H = torch.zeros(cols, cols)
    xs = [torch.randn(200, cols, generator=g) for _ in range(2)]
    for x in xs:
        accumulate_upper(H, x)
    X = torch.cat(xs).double()
    full = mirror_upper(H)
    assert torch.equal(full, full.T)
    assert torch.allclose(full.double(), X.T @ X, rtol=1e-5, atol=1e-3)
