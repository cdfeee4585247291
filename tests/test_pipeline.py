"""quantize_model end to end on a tiny random Whisper and real speech clips."""
import json

import pytest
import torch

from tarq.config import QuantConfig
from tarq.errors import CalibrationError, Cancelled, ModelError
from tarq.models.whisper import quantizable_names
from tarq.pipeline import quantize_model


def report_of(path):
    return json.loads((path / "tarq_report.json").read_text())


@pytest.mark.parametrize("method", ["rtn", "gptq", "tarq"])
def test_each_method_writes_a_loadable_artifact(method, tiny_whisper_dir, calib_dir, tmp_path):
    from tarq.artifact import load_artifact
    from tarq.qlinear import QuantLinear

    seen = []
    out = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / method, QuantConfig(method=method, batch_size=4),
                         progress=seen.append)
    report = report_of(out)
    assert report["config"]["method"] == method
    steps = report["quantize_seconds"]
    if method == "rtn":
        assert steps == {}
    else:
        assert set(steps) == {"forward", "statistics", "solve"} and all(v > 0 for v in steps.values())
        assert sum(steps.values()) <= report["seconds"]["quantize"]
    model, _ = load_artifact(out)
    names = quantizable_names(model)
    assert len(names) == 2 * 6 + 2 * 10
    for name in names:
        assert isinstance(model.get_submodule(name), QuantLinear), name
    assert {r["name"] for r in report["layers"]} == set(names)
    blocks = [p for p in seen if p.stage in ("encoder", "decoder")]
    assert [p.layer for p in blocks] == [1, 2, 3, 4] and blocks[-1].fraction == 1.0
    assert seen[-1].stage == "done"


def test_tarq_lambda_above_one_for_decoder_layers(tiny_whisper_dir, calib_dir, tmp_path):
    out = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "t", QuantConfig(batch_size=4))
    report = report_of(out)
    assert report["calibration"]["tail_tokens"] > 0
    dec = [r for r in report["layers"] if ".decoder." in r["name"] and "encoder_attn.k_proj" not in r["name"]
           and "encoder_attn.v_proj" not in r["name"]]
    assert dec and all(r["lambda"] > 1 for r in dec)
    assert all(r["alpha"] is not None for r in report["layers"])
    # encoder positions are all common by default: encoder layers reduce to GPTQ + residual
    enc = [r for r in report["layers"] if ".encoder." in r["name"]]
    assert all(r["lambda"] == 1.0 and r["tail_positions"] == 0 for r in enc)
    for r in report["layers"]:
        assert r["loss_final"] < r["loss_rtn"], r["name"]


def test_lambda_over_text_positions_changes_decoder_lambdas_only(tiny_whisper_dir, calib_dir, tmp_path):
    """lambda_positions "text" leaves the prompt positions' share out of lambda: decoder layers, which saw
    the prompt, get another lambda (and the report says how much of the trace the prompt held); encoder
    layers and the cross-attention k/v (no prompt there) are unchanged."""
    runs = {k: report_of(quantize_model(tiny_whisper_dir, calib_dir, tmp_path / k,
                                        QuantConfig(batch_size=4, lambda_positions=k)))
            for k in ("all", "text")}
    by_name = {k: {r["name"]: r for r in rep["layers"]} for k, rep in runs.items()}
    assert runs["text"]["config"]["lambda_positions"] == "text"
    for name, r in by_name["all"].items():
        t = by_name["text"][name]
        prompt_seen = ".decoder." in name and "encoder_attn.k_proj" not in name and "encoder_attn.v_proj" not in name
        if prompt_seen:
            assert 0 < r["prompt_share"] < 1 and 0 < t["prompt_share"] < 1, name
        else:
            assert r["prompt_share"] is None or r["prompt_share"] == 0, name
    first = [n for n in by_name["all"] if ".decoder.layers.0." in n and "self_attn.q_proj" in n][0]
    # the first layer of the decoder sees the same inputs in both runs: the lambdas differ by exactly the prompt
    a, t = by_name["all"][first], by_name["text"][first]
    assert t["prompt_share"] == pytest.approx(a["prompt_share"], rel=1e-5)
    assert t["lambda"] == pytest.approx(a["lambda"] * (1 - a["prompt_share"] / (1 - a["tail_share"])), rel=1e-3)
    assert t["lambda"] < a["lambda"]


def test_frame_tagging_marks_encoder_positions(tiny_whisper_dir, calib_dir, tmp_path):
    out = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "f",
                         QuantConfig(encoder_tagging="frames", batch_size=4))
    report = report_of(out)
    assert report["calibration"]["tail_frames"] > 0
    enc = [r for r in report["layers"] if ".encoder." in r["name"]]
    assert all(r["lambda"] > 1 and r["tail_positions"] > 0 for r in enc)


def test_pseudo_labels_when_no_transcripts(tiny_whisper_dir, audio_only_dir, tmp_path):
    out = quantize_model(tiny_whisper_dir, audio_only_dir, tmp_path / "p",
                         QuantConfig(method="gptq", batch_size=4))
    report = report_of(out)
    assert report["transcripts"] == {"given": 0, "pseudo_labelled": 3}
    assert report["calibration"]["tokens"] > 0


def test_ablations_change_the_result(tiny_whisper_dir, calib_dir, tmp_path):
    from safetensors.torch import load_file

    key = "model.decoder.layers.1.fc1.weight_packed"
    packed = {}
    for name, cfg in {"both": {}, "no_rarebal": {"rarebal": False}, "no_residual": {"residual": False}}.items():
        out = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / name, QuantConfig(batch_size=4, **cfg))
        packed[name] = load_file(out / "model.safetensors")[key]
        layers = {r["name"]: r for r in report_of(out)["layers"]}
        fc1 = layers["model.decoder.layers.1.fc1"]
        assert (fc1["lambda"] > 1) == cfg.get("rarebal", True)
        assert (fc1["alpha"] is not None) == cfg.get("residual", True)
    assert not torch.equal(packed["both"], packed["no_rarebal"])
    assert not torch.equal(packed["both"], packed["no_residual"])


def test_deterministic(tiny_whisper_dir, calib_dir, tmp_path):
    from safetensors.torch import load_file

    outs = [quantize_model(tiny_whisper_dir, calib_dir, tmp_path / str(i), QuantConfig(method="gptq", batch_size=4))
            for i in range(2)]
    a, b = (load_file(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,mode", [("gptq", "block"), ("tarq", "layer")])
def test_cancel_stops_the_run(method, mode, tiny_whisper_dir, calib_dir, tmp_path):
    import gc

    from greenlet import greenlet

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2  # "layer": while the block's forwards stand paused before its first group

    with pytest.raises(Cancelled):
        quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "c",
                       QuantConfig(method=method, batch_size=4, sequential=mode), should_stop=stop)
    assert not (tmp_path / "c" / "model.safetensors").exists()
    gc.collect()
    paused = [g for g in gc.get_objects() if type(g) is greenlet and g and g.parent is not None]
    assert not paused, "a paused forward was left running"


def test_calibration_errors(tiny_whisper_dir, tmp_path):
    with pytest.raises(CalibrationError, match="needs calibration audio"):
        quantize_model(tiny_whisper_dir, None, tmp_path / "x", QuantConfig(method="gptq"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="no audio"):
        quantize_model(tiny_whisper_dir, empty, tmp_path / "x", QuantConfig(method="gptq"))


def test_bad_model_folder(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        quantize_model(tmp_path / "m", None, tmp_path / "x", QuantConfig(method="rtn"))


def test_layer_sequential_solves_later_groups_on_quantized_inputs(tiny_whisper_dir, calib_dir, tmp_path):
    from safetensors.torch import load_file

    packed = {}
    for mode in ("block", "layer"):
        out = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / mode,
                             QuantConfig(method="gptq", batch_size=4, sequential=mode))
        packed[mode] = load_file(out / "model.safetensors")
    first = "model.encoder.layers.0.self_attn.q_proj.weight_packed"  # first group: same inputs either way
    later = "model.encoder.layers.0.fc2.weight_packed"  # reads the output of the quantized fc1 in "layer"
    assert torch.equal(packed["block"][first], packed["layer"][first])
    assert not torch.equal(packed["block"][later], packed["layer"][later])


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_layer_sequential_solves_each_group_on_the_quantized_blocks_own_inputs(mode, tiny_whisper_dir, calib_dir):
    """In "layer" mode fc2 of encoder block 0 is solved on exactly the inputs the finished quantized block
    gives it (its reported loss, recomputed from them, agrees); in "block" mode it is solved on the
    full-precision block's, and the recomputed loss does not agree."""
    from tarq.calibrate import load_samples, prepare
    from tarq.models import whisper
    from tarq.models.loader import load_whisper
    from tarq.sequential import Driver

    config = QuantConfig(method="gptq", batch_size=4, num_samples=4, sequential=mode)
    model, processor = load_whisper(tiny_whisper_dir)
    data = prepare(model, processor, load_samples(calib_dir, 4), config, "cpu", torch.float32)
    block = whisper.blocks(model)[0]
    W = block.linear("fc2").weight.detach().clone()
    driver = Driver(model, config)
    driver.run(data)
    Q = block.linear("fc2").weight.detach()  # the model now holds the dequantized weights
    assert not torch.equal(W, Q)
    seen = []
    handle = block.linear("fc2").register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        h, kw = whisper.encoder_inputs(model, data.features)
        block.module(h, **{k: v for k, v in kw.items() if k != "hidden_states"})
    handle.remove()
    X = seen[0].reshape(-1, W.shape[1])
    recomputed = float(((X @ (W - Q).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
    reported = next(r["loss_final"] for r in driver.layers if r["name"] == f"{block.prefix}.fc2")
    if mode == "layer":
        assert recomputed == pytest.approx(reported, rel=1e-3)
    else:
        assert recomputed != pytest.approx(reported, rel=1e-2)


def test_layer_sequential_tarq_full_step_follows_the_full_precision_stream(tiny_whisper_dir, calib_dir, tmp_path):
    from tarq.artifact import load_artifact

    full = report_of(quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "full",
                                    QuantConfig(batch_size=4, sequential="layer", residual_step="full")))
    paper = report_of(quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "paper", QuantConfig(batch_size=4)))
    assert full["config"]["sequential"] == "layer"
    assert all(r["alpha"] == 1.0 for r in full["layers"])
    assert {r["name"] for r in full["layers"]} == set(quantizable_names(load_artifact(tmp_path / "full")[0]))
    blocks = [f"model.{side}.layers.{i}" for side in ("encoder", "decoder") for i in (0, 1)]
    for report in (full, paper):
        assert [d["block"] for d in report["stream_drift"]] == blocks
        assert all(d["drift"] > 0 for d in report["stream_drift"])
    # the least-squares step, solved group after group, ends closer to the full-precision network
    assert full["stream_drift"][-1]["drift"] < paper["stream_drift"][-1]["drift"]


def test_encoder_batches_stay_under_the_heap_limit_on_cpu():
    from transformers import WhisperConfig

    from tarq.models.whisper import HEAP_ALLOC_MAX, encoder_batch_size

    base = WhisperConfig(d_model=512, encoder_ffn_dim=2048, max_source_positions=1500)
    large = WhisperConfig(d_model=1280, encoder_ffn_dim=5120, max_source_positions=1500)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert encoder_batch_size(base, 8, cpu, 4) == 2  # 12.3 MB of fc1 output per clip
    assert 2 * 1500 * 2048 * 4 <= HEAP_ALLOC_MAX < 3 * 1500 * 2048 * 4
    assert encoder_batch_size(base, 8, cpu, 2) == 5
    assert encoder_batch_size(base, 1, cpu, 4) == 1
    assert encoder_batch_size(large, 8, cpu, 4) == 1
    assert encoder_batch_size(base, 8, cuda, 4) == 8


@pytest.mark.parametrize("method", ["gptq", "tarq"])
def test_encoder_batches_do_not_change_the_result(method, tiny_whisper_dir, calib_dir, tmp_path, monkeypatch):
    """Encoder calls of one clip each, regrouped into the decoder's batches of 4, solve the same problems."""
    from safetensors.torch import load_file

    from tarq.models import whisper

    config = QuantConfig(method=method, batch_size=4, num_samples=6)
    wide = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "wide", config)
    monkeypatch.setattr(whisper, "HEAP_ALLOC_MAX", 1)
    narrow = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "narrow", config)
    reports = report_of(wide), report_of(narrow)
    assert reports[0]["encoder_batch_size"] == 4 and reports[1]["encoder_batch_size"] == 1
    # the first layers' Hessians differ only in summation order: the same codes, bar a rare tie
    key = "model.encoder.layers.0.self_attn.q_proj.weight_packed"
    codes = [load_file(o / "model.safetensors")[key].view(torch.uint8) for o in (wide, narrow)]
    assert (codes[0] == codes[1]).float().mean() > 0.999
    # later on, GPTQ's error feedback turns each flipped code into a few more (as between any two batch
    # sizes), but every layer sees the same positions and ends at about the same loss
    for a, b in zip(*(r["layers"] for r in reports)):
        assert (a["name"], a["positions"], a["tail_positions"]) == (b["name"], b["positions"], b["tail_positions"])
        assert a["loss_final"] == pytest.approx(b["loss_final"], rel=0.1), a["name"]
    drift = [[d["drift"] for d in r["stream_drift"]] for r in reports]
    assert drift[0] == pytest.approx(drift[1], rel=0.1) and len(drift[0]) == (4 if method == "tarq" else 0)


@pytest.mark.parametrize("method", ["gptq", "tarq"])
def test_bf16_forward_passes_solve_about_the_same_problems(method, tiny_whisper_dir, calib_dir, tmp_path,
                                                           monkeypatch):
    """forward_dtype=bfloat16: the block passes run under autocast (their matmuls give bf16), the streams'
    residual path, the Hessians and the solves stay float32; every layer sees the same positions and
    ends at about the float32 passes' loss."""
    from tarq import sequential

    seen: set[torch.dtype] = set()
    forward = sequential.Driver.forward

    def watched(self, block, h, kw):
        out = forward(self, block, h, kw)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(sequential.Driver, "forward", watched)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        outs[dtype] = quantize_model(tiny_whisper_dir, calib_dir, tmp_path / dtype,
                                     QuantConfig(method=method, batch_size=4, num_samples=6, forward_dtype=dtype))
    assert seen == {torch.float32}  # the residual stream between blocks
    fp32, bf16 = report_of(outs["float32"]), report_of(outs["bfloat16"])
    assert (fp32["forward_dtype"], bf16["forward_dtype"]) == ("float32", "bfloat16")
    assert bf16["config"]["forward_dtype"] == "bfloat16"
    for a, b in zip(fp32["layers"], bf16["layers"]):
        assert (a["name"], a["positions"], a["tail_positions"]) == (b["name"], b["positions"], b["tail_positions"])
        assert b["loss_final"] == pytest.approx(a["loss_final"], rel=0.15), a["name"]
    from safetensors.torch import load_file

    tensors = [load_file(o / "model.safetensors") for o in outs.values()]
    packed = [k for k in tensors[0] if k.endswith("weight_packed")]
    same = {k: float((tensors[0][k].view(torch.uint8) == tensors[1][k].view(torch.uint8)).float().mean())
            for k in packed}
    # encoder block 0's q/k/v read the float32 layer norm of the front end: the same codes
    assert same["model.encoder.layers.0.self_attn.q_proj.weight_packed"] == 1.0
    # what reads a bf16 matmul's output is rounded differently, and GPTQ's error feedback spreads each
    # flipped code; still most codes agree
    assert same["model.encoder.layers.0.fc2.weight_packed"] < 1.0
    assert min(same.values()) > 0.5 and sum(same.values()) / len(same) > 0.8, same


def test_bf16_forward_passes_compute_in_bf16(tiny_whisper_dir):
    """Inside a pass the Linear layers compute in bf16 (autocast), outside it nothing changes."""
    from tarq.models.loader import load_whisper
    from tarq.sequential import Driver

    model, _ = load_whisper(tiny_whisper_dir)
    driver = Driver(model, QuantConfig(method="gptq", forward_dtype="bfloat16"))
    block = driver.blocks[0]
    out_dtypes = []
    handle = block.linear("fc1").register_forward_hook(lambda m, a, out: out_dtypes.append(out.dtype))
    h = torch.randn(1, 10, model.config.d_model)
    driver.forward(block, h, {"attention_mask": None})
    block.linear("fc1")(h)
    handle.remove()
    assert out_dtypes == [torch.bfloat16, torch.float32]
    assert Driver(model, QuantConfig(method="gptq")).forward_dtype == torch.float32
    with pytest.raises(ValueError, match="forward_dtype must be one of"):
        QuantConfig(forward_dtype="int8")


def test_tarq_first_encoder_block_runs_once_for_both_streams(tiny_whisper_dir, calib_dir, tmp_path, monkeypatch):
    """Both streams enter encoder block 0 with the same hidden states: one full-precision pass serves the
    x stream's statistics and the full-precision stream, then the quantized block advances x."""
    from tarq import sequential

    calls: dict[str, int] = {}
    forward = sequential.Driver.forward

    def counted(self, block, h, kw):
        calls[block.prefix] = calls.get(block.prefix, 0) + 1
        return forward(self, block, h, kw)

    monkeypatch.setattr(sequential.Driver, "forward", counted)
    quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "t", QuantConfig(batch_size=4, num_samples=8))
    assert calls == {"model.encoder.layers.0": 2 * 2, "model.encoder.layers.1": 3 * 2,
                     "model.decoder.layers.0": 3 * 2, "model.decoder.layers.1": 3 * 2}


@pytest.mark.parametrize("method,mode,expected", [
    ("gptq", "block", [True, True, False, False]),  # statistics pass, then the advance pass
    ("tarq", "block", [True] * 4 + [False, False]),  # each batch on both streams, then the advance pass
    ("gptq", "layer", [False, False]),  # one pass: k/v are solved before it reaches them
    ("tarq", "layer", [True, True, False, False]),  # the full-precision stream passes them first
])
def test_decoder_blocks_advance_through_quantized_cross_attention(method, mode, expected, tiny_whisper_dir,
                                                                  calib_dir, tmp_path, monkeypatch):
    """x leaves a decoder block through every quantized layer of it, cross-attention k/v included; the
    full-precision stream through full-precision ones. One call per batch (2) and pass: in "layer" mode one
    pass per stream."""
    from tarq import sequential

    calls: dict[str, list[bool]] = {}  # per call of cross-attention k: was its weight full precision?
    blocks: dict[str, int] = {}  # block calls
    run = sequential.Driver.run

    def hooked(self, data):
        for b in self.blocks:
            if b.side == "decoder":
                fp = b.linear("encoder_attn.k_proj").weight.detach().clone()
                b.linear("encoder_attn.k_proj").register_forward_hook(
                    lambda m, a, out, p=b.prefix, fp=fp: calls.setdefault(p, []).append(torch.equal(m.weight, fp)))
                b.module.register_forward_pre_hook(lambda m, a, p=b.prefix: blocks.__setitem__(p, blocks.get(p, 0) + 1))
        return run(self, data)

    monkeypatch.setattr(sequential.Driver, "run", hooked)
    quantize_model(tiny_whisper_dir, calib_dir, tmp_path / "q",
                   QuantConfig(method=method, batch_size=4, num_samples=8, sequential=mode))
    assert calls == {"model.decoder.layers.0": expected, "model.decoder.layers.1": expected}
    # block 0 is also called once per batch to capture its inputs (stopped there)
    assert blocks == {"model.decoder.layers.0": len(expected) + 2, "model.decoder.layers.1": len(expected)}
