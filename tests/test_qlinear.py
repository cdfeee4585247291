"""QuantLinear: compressed-tensors packing, the int4 kernel against the dequantized reference, module swap."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tarq.qlinear import (QuantLinear, counting_kernels, kernel_calls, pack, pack_zero, replace_linears, trivial_g_idx,
                          unpack, unpack_zero)
from tarq.quantizer import QuantizedWeight, rtn

HAS_CPU_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    codes = torch.randint(0, 2**bits, (40, 256), dtype=torch.uint8)
    codes[0, :2] = torch.tensor([0, 2**bits - 1])  # both ends of the range
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (40, 256 * bits // 32)
    assert torch.equal(unpack(packed, bits, (40, 256)), codes)
    zero = torch.randint(0, 2**bits, (40, 4), dtype=torch.int32)
    pz = pack_zero(zero, bits)
    assert pz.dtype == torch.int32 and pz.shape == (-(-40 * bits // 32), 4)
    assert torch.equal(unpack_zero(pz, bits, (40, 4)), zero)


def test_four_bit_packs_eight_codes_per_word():
    # compressed-tensors takes signed codes (code - 8) and re-adds the offset before packing, so each nibble
    # holds the unsigned code, the first column in the lowest bits.
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    assert pack(codes, 4)[0, 0].item() == 0x76543210


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_library_decompress_reads_our_tensors_as_we_mean_them(bits, sym):
    """compressed-tensors' own decompressor on our buffers gives exactly scale * (code - zero)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qw = rtn(torch.randn(48, 256), bits, 64, sym)
    layer = QuantLinear.from_quantized(qw)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=64))
    state = {k: v for k, v in layer.state_dict().items() if k.startswith("weight")}
    assert ("weight_zero_point" in state) == (not sym)
    weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(weight, qw.dequantize())


def test_from_quantized_holds_only_packed_buffers():
    qw = rtn(torch.randn(64, 256), 4, 128, sym=False)
    bias = torch.randn(64)
    layer = QuantLinear.from_quantized(qw, bias)
    assert not hasattr(layer, "weight")
    names = {n: t.dtype for n, t in layer.state_dict().items()}
    assert names == {"weight_packed": torch.int32, "weight_scale": torch.float32, "weight_zero_point": torch.int32,
                     "weight_shape": torch.int64, "bias": torch.float32}
    assert layer.weight_packed.shape == (64, 32)
    assert torch.equal(layer.codes(), qw.codes) and torch.equal(layer.zeros(), qw.zero)
    assert torch.equal(layer.dequantize(), qw.dequantize())
    sym = QuantLinear.from_quantized(rtn(torch.randn(64, 256), 4, 128, sym=True))
    assert "weight_zero_point" not in sym.state_dict() and "weight_g_idx" not in sym.state_dict()


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch has no CPU int4 kernel")
@pytest.mark.parametrize("sym", [True, False])
def test_cpu_int4_kernel_matches_dequantized_reference(sym, monkeypatch):
    qw = rtn(torch.randn(512, 2048), 4, 128, sym)
    layer = QuantLinear.from_quantized(qw, torch.randn(512))
    x = torch.randn(2, 3, 2048)
    ref = x @ qw.dequantize().T + layer.bias
    # Default: the kernel computes in bf16 (its fast path): bf16 activations and scales.
    y = layer(x)
    assert layer.kernel == "int4pack-cpu" and y.dtype == torch.float32 and y.shape == (2, 3, 512)
    assert rel(y, ref) < 1e-2
    # fp32 compute: the same kernel agrees to float32 rounding, so the zero mapping is exact.
    monkeypatch.setattr(QuantLinear, "cpu_compute_dtype", None)
    y32 = layer(x)
    assert layer.kernel == "int4pack-cpu" and rel(y32, ref) < 1e-5
    # bf16 inputs stay bf16
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel(yb, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sym", [True, False])
def test_cuda_tinygemm_matches_dequantized_reference(sym):
    qw = rtn(torch.randn(512, 2048), 4, 128, sym)
    layer = QuantLinear.from_quantized(qw, torch.randn(512)).to("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(3, 7, 2048, device="cuda", dtype=dtype)
        ref = x.float() @ qw.dequantize().cuda().T + layer.bias
        y = layer(x)
        assert layer.kernel == "tinygemm-cuda" and y.dtype == dtype and y.shape == (3, 7, 512)
        assert rel(y, ref) < 1e-2  # tinygemm computes in bf16


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch has no CPU int4 kernel")
def test_kernel_zero_mapping_at_grid_edges(monkeypatch):
    """z = 0 and z = 15 (and every value between) map to the kernel's float zero (8 - z) * scale exactly."""
    monkeypatch.setattr(QuantLinear, "cpu_compute_dtype", None)
    out, cols, gs = 16, 256, 128
    codes = torch.randint(0, 16, (out, cols), dtype=torch.uint8)
    zero = torch.arange(out * 2, dtype=torch.int32).reshape(out, 2) % 16
    scale = torch.rand(out, 2) * 0.1 + 0.01
    qw = QuantizedWeight(codes, scale, zero, torch.arange(cols, dtype=torch.int32) // gs, 4, gs, False)
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(4, cols)
    assert rel(layer(x), x @ qw.dequantize().T) < 1e-5 and layer.kernel == "int4pack-cpu"


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch has no CPU int4 kernel")
def test_many_rows_switch_to_dequant_unless_forced(monkeypatch):
    monkeypatch.setattr(QuantLinear, "cpu_dense_dtype", None)
    qw = rtn(torch.randn(64, 256), 4, 128, sym=False)
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(QuantLinear.cpu_kernel_max_rows + 1, 256)
    ref = x @ qw.dequantize().T
    assert rel(layer(x), ref) < 1e-6 and layer.kernel == "dequant"
    monkeypatch.setattr(QuantLinear, "cpu_kernel_max_rows", None)
    assert rel(layer(x), ref) < 1e-2 and layer.kernel == "int4pack-cpu"


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch has no CPU int4 kernel")
def test_calls_are_counted_by_the_path_they_took(monkeypatch):
    monkeypatch.setattr(QuantLinear, "cpu_dense_dtype", None)
    model = nn.Sequential(QuantLinear.from_quantized(rtn(torch.randn(128, 256), 4, 128, sym=False)),
                          QuantLinear.from_quantized(rtn(torch.randn(256, 128), 4, 128, sym=True)), nn.Linear(256, 8))
    many = QuantLinear.cpu_kernel_max_rows + 1
    model(torch.randn(3, 256))  # before the block: not counted in it
    with counting_kernels(model) as counts:
        for rows in (1, 2, many):
            model(torch.randn(rows, 256))
        assert counts == {}  # filled when the block ends
    assert counts == {"int4pack-cpu": 4, "dequant": 2}
    assert kernel_calls(model) == {"int4pack-cpu": 6, "dequant": 2}
    with counting_kernels(nn.Sequential(nn.Linear(4, 4))) as none:
        pass
    assert none == {}


def test_compiled_forwards_do_not_recompile_for_the_count(monkeypatch):
    """The count lives outside traced graphs: a graph that read it would guard on its value and
    recompile at every call (the GPU check's compiled decoding runs QuantLinear under torch.compile)."""
    import torch._dynamo

    monkeypatch.setattr(QuantLinear, "cpu_dense_dtype", None)  # "auto" would probe the CPU inside the trace
    torch._dynamo.reset()
    layer = QuantLinear.from_quantized(rtn(torch.randn(64, 256), 4, 128, sym=False))
    x = torch.randn(2, 256)
    layer(x)  # builds the kernel layout (a cache miss in the first graph would recompile once, rightly)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            y = compiled(x)
    assert rel(y, x @ layer.dequantize().T) < 1e-2
    assert kernel_calls(layer) == {layer.kernel: 1}  # the eager call only


def test_cuda_capability_is_asked_once_per_device(monkeypatch):
    """Later calls (a torch.compile trace among them) read the answer instead of asking the driver."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(str(d)) or (9, 0))
    monkeypatch.setattr(QuantLinear, "_sm80", {})
    a = QuantLinear.from_quantized(rtn(torch.randn(64, 256), 4, 128, sym=False))
    b = QuantLinear.from_quantized(rtn(torch.randn(32, 256), 4, 128, sym=True))
    for layer in (a, b, a):
        assert layer._tinygemm_ok(torch.device("cuda:0"))
    assert b._tinygemm_ok(torch.device("cuda:1"))
    assert asked == ["cuda:0", "cuda:1"]


def test_many_rows_on_a_bf16_cpu_take_the_bf16_dense_path(monkeypatch):
    """float32 in, float32 out; the matmul (bias fused) runs in cpu_dense_dtype."""
    monkeypatch.setattr(QuantLinear, "cpu_dense_dtype", torch.bfloat16)
    qw = rtn(torch.randn(64, 256), 4, 128, sym=False)
    layer = QuantLinear.from_quantized(qw, torch.randn(64) * 10)
    x = torch.randn(2, QuantLinear.cpu_kernel_max_rows, 256)
    ref = x @ qw.dequantize().T + layer.bias
    y = layer(x)
    assert layer.kernel == "dequant-bf16" and y.dtype == torch.float32 and y.shape == (2, 128, 64)
    assert 1e-5 < rel(y, ref) < 1e-2  # bf16 rounding is there, and only that
    # bf16 and float16 inputs keep their dtype on the plain path
    yb = layer(x.bfloat16())
    assert layer.kernel == "dequant" and yb.dtype == torch.bfloat16 and rel(yb, ref) < 1e-2


def test_tarq_cpu_bf16_setting(monkeypatch):
    from tarq.qlinear import cpu_bf16_pays, cpu_dense_dtype_from_env

    monkeypatch.setenv("TARQ_CPU_BF16", "0")
    assert cpu_dense_dtype_from_env() is None
    monkeypatch.setenv("TARQ_CPU_BF16", "1")
    assert cpu_dense_dtype_from_env() is torch.bfloat16
    monkeypatch.setenv("TARQ_CPU_BF16", "auto")
    assert (cpu_dense_dtype_from_env() is torch.bfloat16) == cpu_bf16_pays()
    monkeypatch.setenv("TARQ_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="TARQ_CPU_BF16 must be auto, 0 or 1, not 'yes'"):
        cpu_dense_dtype_from_env()
    # the class resolves "auto" on first use, from the environment of that moment
    monkeypatch.setattr(QuantLinear, "cpu_dense_dtype", "auto")
    monkeypatch.setenv("TARQ_CPU_BF16", "1")
    assert QuantLinear.dense_dtype() is torch.bfloat16 and QuantLinear.cpu_dense_dtype is torch.bfloat16


@pytest.fixture
def fresh_probe():
    from tarq import qlinear

    qlinear.cpu_bf16_probe.cache_clear()
    yield qlinear
    qlinear.cpu_bf16_probe.cache_clear()


def test_bf16_auto_follows_the_probe_not_the_flags(monkeypatch, fresh_probe, caplog):
    q = fresh_probe
    # no bf16 instructions: bf16 is emulated, nothing is measured
    monkeypatch.setattr(q, "cpu_bf16_flags", lambda: False)
    monkeypatch.setattr(q, "bf16_matmul_speedup", lambda: pytest.fail("probed a CPU without bf16"))
    assert q.cpu_bf16_probe() is None and not q.cpu_bf16_pays()
    # flags, but bf16 measured slower (the AVX512-BF16 Xeon without AMX): float32 stays
    monkeypatch.setattr(q, "cpu_bf16_flags", lambda: True)
    for speedup, pays in ((0.75, False), (1.1, False), (2.1, True)):
        q.cpu_bf16_probe.cache_clear()
        monkeypatch.setattr(q, "bf16_matmul_speedup", lambda s=speedup: s)
        monkeypatch.setenv("TARQ_CPU_BF16", "auto")
        with caplog.at_level("INFO", logger="tarq.qlinear"):
            assert q.cpu_bf16_pays() is pays
            assert (q.cpu_dense_dtype_from_env() is torch.bfloat16) is pays
        assert f"bf16 matmul {speedup:.2f}x float32" in caplog.text
    # measured once per process
    monkeypatch.setattr(q, "bf16_matmul_speedup", lambda: pytest.fail("probed twice"))
    assert q.cpu_bf16_pays()


def test_bf16_probe_measures_this_cpu():
    from tarq.qlinear import bf16_matmul_speedup

    speedup = bf16_matmul_speedup(rows=64, cols=128, out=256, reps=2)
    assert math.isfinite(speedup) and speedup > 0


def test_importing_runs_no_probe():
    import subprocess
    import sys

    code = ("import tarq.qlinear as q; assert q.QuantLinear.cpu_dense_dtype == 'auto'; "
            "assert q.cpu_bf16_probe.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dequantize_matches_the_quantized_weight_exactly():
    for sym in (True, False):
        qw = rtn(torch.randn(48, 384), 4, 128, sym=sym)
        layer = QuantLinear.from_quantized(qw)
        assert torch.equal(layer.dequantize(torch.float32), qw.dequantize())
        assert torch.equal(layer.dequantize(torch.bfloat16), qw.dequantize().bfloat16())


def test_other_bits_and_act_order_use_the_dequant_path(monkeypatch):
    monkeypatch.setattr(QuantLinear, "cpu_dense_dtype", None)
    x = torch.randn(5, 256)
    for bits in (3, 8):
        qw = rtn(torch.randn(32, 256), bits, 64, sym=False)
        layer = QuantLinear.from_quantized(qw)
        assert rel(layer(x), x @ qw.dequantize().T) < 1e-6 and layer.kernel == "dequant"
    # act-order: columns belong to groups in a permuted order -> g_idx is stored and honoured
    qw = rtn(torch.randn(32, 256), 4, 64, sym=False)
    qw.g_idx = qw.g_idx[torch.randperm(256)]
    assert not trivial_g_idx(qw.g_idx, 64)
    layer = QuantLinear.from_quantized(qw)
    assert "weight_g_idx" in layer.state_dict()
    assert rel(layer(x), x @ qw.dequantize().T) < 1e-6 and layer.kernel == "dequant"


def test_kernel_cache_is_rebuilt_after_a_move():
    layer = QuantLinear.from_quantized(rtn(torch.randn(32, 256), 4, 128, sym=False))
    x = torch.randn(2, 256)
    y = layer(x)
    assert layer._cache and "_cache" not in layer.state_dict()
    layer.to(torch.float64)  # casts the float scale; the cached kernel layout must not survive
    assert not layer._cache
    assert rel(layer(x.double()), y) < 1e-2


def test_replace_linears_matches_fake_quant_model(tiny_whisper_dir):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    quantized = {n: rtn(model.get_submodule(n).weight.data, 4, 128, sym=False) for n in names}
    fake = copy.deepcopy(model)
    for n, qw in quantized.items():
        fake.get_submodule(n).weight.data = qw.dequantize()
    replace_linears(model, quantized)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert isinstance(model.proj_out, nn.Linear)
    feats, dec = torch.randn(1, 80, 3000), torch.tensor([[50257, 50362, 100, 200]])
    with torch.no_grad():
        a = model(input_features=feats, decoder_input_ids=dec).logits
        b = fake(input_features=feats, decoder_input_ids=dec).logits
    assert rel(a, b) < 2e-2
    with pytest.raises(ValueError, match="not nn.Linear"):
        replace_linears(model, {"model.encoder.conv1": quantized[names[0]]})
