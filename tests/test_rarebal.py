"""RAREBAL and the residual correction against their definitions in TARQ.md."""
import pytest
import torch

from tarq.gptq import h_loss
from tarq.rarebal import LayerStats, drift_direction, h_inner, rarebal, residual_alpha, tarq_solve


def stats_from(x, tail, x_fp=None):
    st = LayerStats(x.shape[1], with_delta=x_fp is not None)
    st.add(x, tail, x_fp)
    return st


def test_split_hessians_sum_to_h():
    x = torch.randn(300, 32)
    tail = torch.rand(300) < 0.1
    st = stats_from(x, tail)
    assert torch.allclose(st.H, x.T @ x, rtol=1e-4, atol=1e-3)
    assert st.n_tail == int(tail.sum()) and st.n_common == 300 - int(tail.sum())


def test_split_hessians_of_wide_layers():
    """Wide layers accumulate in stripes; Hc, Ht and H read back whole and symmetric."""
    x = torch.randn(300, 1024)
    tail = torch.rand(300) < 0.2
    st = LayerStats(1024)
    st.add(x[:150], tail[:150])
    assert torch.allclose(st.Hc, x[:150][~tail[:150]].T @ x[:150][~tail[:150]], rtol=1e-4, atol=1e-3)
    st.add(x[150:], tail[150:])  # a read in between must not leave a stale mirror
    for got, rows in ((st.Hc, ~tail), (st.Ht, tail)):
        assert torch.allclose(got, x[rows].T @ x[rows], rtol=1e-4, atol=1e-3)
        assert torch.equal(got, got.T)
    assert st.tail_share == pytest.approx(float(x[tail].pow(2).sum() / x.pow(2).sum()), rel=1e-4)


def test_rarebal_equal_trace_mass():
    x = torch.randn(500, 32)
    tail = torch.rand(500) < 0.07
    x[tail] *= 0.5  # tail positions also carry less energy per position
    st = stats_from(x, tail)
    H_rb, lam = rarebal(st)
    assert lam > 1
    assert float(torch.trace(lam * st.Ht)) == pytest.approx(float(torch.trace(st.Hc)), rel=1e-5)
    assert torch.allclose(H_rb, st.Hc + lam * st.Ht)
    _, lam2 = rarebal(st, cost=2.0)
    assert lam2 == pytest.approx(2 * lam)


def test_lambda_over_text_positions_leaves_the_prompts_share_out_of_tr_hc_only():
    """A prompt position with a massive activation (whisper-base's <|en|> in decoder block 2) would set
    lambda alone; text_only counts tr(Hc) over the other common positions, and Hc keeps every position."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g)
    tail = torch.rand(400, generator=g) < 0.1
    prompt = torch.zeros(400, dtype=torch.bool)
    prompt[::40] = True  # one per "clip"
    prompt[tail.nonzero()[0]] = True  # a tail position reading a special token is still tail
    x[prompt & ~tail] *= 30.0
    st = LayerStats(32)
    st.add(x[:200], tail[:200], prompt=prompt[:200])
    st.add(x[200:], tail[200:], prompt=prompt[200:])
    sink = prompt & ~tail
    assert st.prompt_trace == pytest.approx(float(x[sink].pow(2).sum()), rel=1e-5)
    assert st.prompt_share == pytest.approx(float(x[sink].pow(2).sum() / x.pow(2).sum()), rel=1e-5)
    H_all, lam_all = rarebal(st)
    H_text, lam_text = rarebal(st, text_only=True)
    text = ~tail & ~prompt
    assert lam_text == pytest.approx(float(x[text].pow(2).sum() / x[tail].pow(2).sum()), rel=1e-4)
    assert lam_all == pytest.approx(float(x[~tail].pow(2).sum() / x[tail].pow(2).sum()), rel=1e-4)
    assert lam_all > 20 * lam_text  # the sinks' ~900x energy made lambda
    assert torch.allclose(H_text, st.Hc + lam_text * st.Ht)  # the prompt rows stay in Hc
    plain = LayerStats(32)
    plain.add(x, tail)
    assert plain.prompt_trace == 0.0 and rarebal(plain, text_only=True)[1] == pytest.approx(lam_all, rel=1e-5)


def test_rarebal_without_tail_is_plain_h():
    x = torch.randn(100, 16)
    st = stats_from(x, None)
    H_rb, lam = rarebal(st)
    assert lam == 1.0 and torch.equal(H_rb, st.H)


def test_drift_direction_is_least_squares_fix():
    """W + D is the brute-force least-squares map from drifted inputs x to full-precision outputs W x_fp."""
    g = torch.Generator().manual_seed(0)
    n, cols, rows = 400, 24, 10
    x_fp = torch.randn(n, cols, generator=g, dtype=torch.float64).float()
    x = x_fp + 0.1 * torch.randn(n, cols, generator=g) + 0.05  # drift: noise and a bias
    W = torch.randn(rows, cols, generator=g)
    st = stats_from(x, None, x_fp)
    D = drift_direction(st.w_hdelta(W), st.H, damp=1e-9)
    # brute force: argmin_V sum_t |V x_t - W x_fp_t|^2
    V = torch.linalg.lstsq(x.double(), (x_fp.double() @ W.double().T)).solution.T
    assert torch.allclose((W + D).double(), V, atol=1e-3)


def test_alpha_is_h_projection():
    g = torch.Generator().manual_seed(1)
    H = torch.randn(16, 16, generator=g)
    H = H @ H.T + torch.eye(16)
    D = torch.randn(4, 16, generator=g)
    E = 0.3 * D + 0.01 * torch.randn(4, 16, generator=g)
    alpha = residual_alpha(E, D, H)
    assert alpha == pytest.approx(h_inner(E, D, H) / h_inner(D, D, H), rel=1e-6)
    assert alpha == pytest.approx(0.3, abs=0.05)
    # E - alpha D is H-orthogonal to D
    assert abs(h_inner(E - alpha * D, D, H)) < 1e-3 * h_inner(D, D, H)


def test_tarq_solve_tail_weighting_lowers_tail_error():
    """With RAREBAL, the error on tail positions falls relative to plain GPTQ on the same data."""
    g = torch.Generator().manual_seed(2)
    cols, rows = 128, 32
    common = torch.randn(2000, cols, generator=g)
    tail = torch.randn(100, cols, generator=g) @ torch.diag(torch.linspace(0.2, 3, cols))  # other directions
    x = torch.cat([common, tail])
    is_tail = torch.cat([torch.zeros(2000, dtype=torch.bool), torch.ones(100, dtype=torch.bool)])
    W = torch.randn(rows, cols, generator=g)
    st = stats_from(x, is_tail)
    kw = dict(bits=3, group_size=128, sym=False, damp=0.01)
    plain = tarq_solve(W, st, use_rarebal=False, use_residual=False, **kw)
    tarq = tarq_solve(W, st, use_rarebal=True, use_residual=False, **kw)
    assert tarq.lam > 5
    assert h_loss(W, tarq.result.weight, st.Ht) < h_loss(W, plain.result.weight, st.Ht)


def test_tarq_solve_residual_follows_the_paper_steps():
    """Pilot on H_rb, alpha per layer from the pilot's displacement, final GPTQ on W + alpha D."""
    from tarq.gptq import gptq

    g = torch.Generator().manual_seed(3)
    cols, rows = 128, 16
    x_fp = torch.randn(1500, cols, generator=g)
    x = x_fp * 1.05 + 0.05 * torch.randn(1500, cols, generator=g)
    W = torch.randn(rows, cols, generator=g)
    st = stats_from(x, None, x_fp)
    kw = dict(bits=4, group_size=128, sym=False, damp=0.01)
    res = tarq_solve(W, st, use_rarebal=False, use_residual=True, splits=[8, 8], **kw)
    pilot = gptq(W, st.H, **kw)
    D = drift_direction(st.w_hdelta(W), st.H, 0.01)
    alphas = [residual_alpha((pilot.weight - W)[s], D[s], st.H) for s in (slice(0, 8), slice(8, 16))]
    assert res.alphas == pytest.approx(alphas, rel=1e-5)
    E = pilot.weight - W
    for k, s in enumerate((slice(0, 8), slice(8, 16))):  # alpha = cos * |E|_H / |D|_H
        assert res.alphas[k] == pytest.approx(res.cosines[k] / res.drift_ratios[k], rel=1e-4)
        assert res.drift_ratios[k] == pytest.approx((h_inner(D[s], D[s], st.H) / h_inner(E[s], E[s], st.H)) ** 0.5)
    assert alphas[0] != pytest.approx(alphas[1])
    target = W.clone()
    target[:8] += alphas[0] * D[:8]
    target[8:] += alphas[1] * D[8:]
    assert torch.allclose(res.result.weight, gptq(target, st.H, **kw).weight, atol=1e-5)
    assert torch.allclose(res.pilot_weight, pilot.weight)


def test_no_drift_reuses_the_pilot_for_the_same_result():
    """x == x_fp: D = 0, alpha = 0, and the final solve is skipped; GPTQ on W itself is what it would give."""
    from tarq.gptq import gptq

    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 128, generator=g)
    W = torch.randn(8, 128, generator=g)
    st = stats_from(x, None, x.clone())
    kw = dict(bits=4, group_size=128, sym=False, damp=0.01)
    for full_step in (False, True):
        res = tarq_solve(W, st, use_rarebal=False, use_residual=True, full_step=full_step, **kw)
        assert res.alphas == ([1.0] if full_step else [0.0])
        assert torch.equal(res.result.weight, res.pilot_weight)
        assert torch.equal(res.result.weight, gptq(W, st.H, **kw).weight)


def test_stats_need_x_fp_when_tracking_drift():
    st = LayerStats(8, with_delta=True)
    with pytest.raises(ValueError, match="x_fp"):
        st.add(torch.randn(4, 8))


def test_full_step_targets_the_least_squares_fix():
    from tarq.gptq import gptq

    g = torch.Generator().manual_seed(4)
    x_fp = torch.randn(800, 128, generator=g)
    x = x_fp * 1.1 + 0.05
    W = torch.randn(8, 128, generator=g)
    st = stats_from(x, None, x_fp)
    kw = dict(bits=4, group_size=128, sym=False, damp=0.01)
    res = tarq_solve(W, st, use_rarebal=False, use_residual=True, full_step=True, **kw)
    assert res.alphas == [1.0]
    D = drift_direction(st.w_hdelta(W), st.H, 0.01)
    assert torch.allclose(res.result.weight, gptq(W + D, st.H, **kw).weight, atol=1e-5)
    # the least-squares target brings the quantized outputs closer to the full-precision ones
    plain = tarq_solve(W, st, use_rarebal=False, use_residual=False, **kw)
    err = lambda Q: float(((x @ Q.T - x_fp @ W.T) ** 2).sum())  # noqa: E731
    assert err(res.result.weight) < err(plain.result.weight)


def test_drift_by_outputs_matches_drift_by_inputs():
    """Accumulating W Hdelta from the layer's outputs gives the same correction as Hdelta itself."""
    g = torch.Generator().manual_seed(5)
    x_fp = torch.randn(600, 128, generator=g)
    x = x_fp + 0.2 * torch.randn(600, 128, generator=g)
    W = torch.randn(16, 128, generator=g)
    tail = torch.rand(600, generator=g) < 0.1
    by_in = stats_from(x, tail, x_fp)
    by_out = LayerStats(128, with_delta=True, delta_rows=16)
    for part in torch.split(torch.arange(600), 256):  # batches, as the driver adds them
        by_out.add(x[part], tail[part], dy=x_fp[part] @ W.T - x[part] @ W.T)
    assert by_out.Hdelta is None
    assert torch.allclose(by_out.w_hdelta(W), by_in.w_hdelta(W), rtol=1e-4, atol=1e-2)
    kw = dict(bits=4, group_size=128, sym=False, damp=0.01)
    a, b = tarq_solve(W, by_in, **kw), tarq_solve(W, by_out, **kw)
    assert a.alphas == pytest.approx(b.alphas, rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="dy"):
        by_out.add(x[:4], None, x_fp[:4])
    with pytest.raises(ValueError, match="accumulated for W"):
        by_out.w_hdelta(W[:8])


@pytest.mark.parametrize("act_order", [False, True])
def test_drift_direction_from_the_prepared_factor(act_order):
    from tarq.gptq import prepare

    g = torch.Generator().manual_seed(6)
    x = torch.randn(500, 64, generator=g) * torch.linspace(0.1, 4, 64)
    H = x.T @ x
    B = torch.randn(12, 64, generator=g)
    direct = drift_direction(B, H, 0.01)
    via = drift_direction(B, H, 0.01, prepare(H, 0.01, act_order))
    assert torch.allclose(via, direct, rtol=1e-3, atol=1e-4)
