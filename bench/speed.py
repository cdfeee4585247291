"""Speed and memory: quantization (RTN / GPTQ / TARQ) and transcription (float vs packed int4), side by side.

    python bench/speed.py                                   # CPU: whisper-tiny.en and whisper-base, everything
    python bench/speed.py --quick                           # smoke run: tiny.en, 2 clips (speed-quick.md)
    python bench/speed.py --solver-only                     # GPTQ column sweep: textbook loop vs tarq.gptq
    python bench/speed.py --device cuda --random-large      # GPU: + whisper-large-v3-shaped random weights

Every number is measured in this run and every ratio is against a baseline measured in the same run
(GPTQ for quantization, the float model for transcription); nothing here asserts a timing. Each
measurement runs in a fresh Python process (--no-isolate to run in this one) so that its peak memory
is its own: peak RSS is the process's high-water mark (VmHWM, reset after imports where Linux allows),
GPU memory is torch.cuda.max_memory_allocated. Writes bench/results/speed.md and speed.json
(--quick: speed-quick.*).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shared speech folder beside the checkout, or wherever TARQ_SPEECH_DIR says (as the tests)
SPEECH = Path(os.environ.get("TARQ_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech"))
RESULTS = ROOT / "bench" / "results"
FIXTURE_GENERATION = ROOT / "tests" / "fixtures" / "whisper-processor-en"
JOB_MARK = "SPEEDJOB "

# whisper-large-v3's shapes (random weights: for speed only, never for quality)
LARGE_V3 = dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, vocab_size=51866,
                num_mel_bins=128, max_source_positions=1500, max_target_positions=448)
# GPTQ problems as the driver hands them to the solver: W [rows, cols] (rows of layers sharing an input
# stacked). whisper-tiny (d 384): q/k/v stacked and fc2; whisper-large-v3 (d 1280): every kind of group.
SOLVER_SHAPES_TINY = {"tiny qkv [1152x384]": (1152, 384), "tiny fc2 [384x1536]": (384, 1536)}
SOLVER_SHAPES_LARGE = {  # name: (rows, cols, groups of this shape in one large-v3 pass)
    "large qkv [3840x1280]": (3840, 1280, 64), "large attn out / cross q,out [1280x1280]": (1280, 1280, 96),
    "large cross kv [2560x1280]": (2560, 1280, 32), "large fc1 [5120x1280]": (5120, 1280, 64),
    "large fc2 [1280x5120]": (1280, 5120, 64),
}
# Linear layers of whisper-base (d 512) as QuantLinear runs them: [out x in]
KERNEL_SHAPES_BASE = {"attn [512x512]": (512, 512), "fc1 [2048x512]": (2048, 512), "fc2 [512x2048]": (512, 2048)}


# ---------------------------------------------------------------------------------------------
# Measuring


def reset_peak_rss() -> None:
    """Restart the kernel's RSS high-water mark (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Meter:
    """Wall time, peak RSS and peak CUDA memory of a `with` block."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> "Meter":
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        self.rss_start = rss_mb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_rss = rss_mb("VmHWM")
        self.peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int = 3, warmup: int = 1) -> float:
    """Best wall time of `reps` calls after `warmup` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------------------------------
# Jobs: each returns a JSON-able dict and may run in its own process (run_job)


def textbook_gptq():
    """The GPTQ loop as it stood before tarq.gptq's sweep was rewritten (kept in the test that pins
    the rewrite to it bit for bit)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_gptq_reference import reference_gptq
    finally:
        sys.path.pop(0)
    return reference_gptq


def job_solver(device: str = "cpu", large: bool = False, reps: int = 3, positions: int = 4096,
               shapes: dict | None = None) -> dict:
    """GPTQ solve time per layer group: the textbook loop vs tarq.gptq.gptq on the same W and H
    (random W, H = X^T X of random correlated X). With `large`, also large-v3 shapes and the estimate of
    one GPTQ pass over all of large-v3's Linear layers (TARQ runs two)."""
    import torch

    from tarq.gptq import accumulate, accumulate_upper, gptq, prepare

    ref = textbook_gptq()
    shapes = {k: (v[0], v[1], v[2] if len(v) > 2 else None)
              for k, v in (shapes or SOLVER_SHAPES_TINY).items()}
    if large:
        shapes.update(SOLVER_SHAPES_LARGE)
    rows_out = []
    g = torch.Generator().manual_seed(0)
    for name, (rows, cols, count) in shapes.items():
        W = torch.randn(rows, cols, generator=g).to(device)
        X = (torch.randn(positions, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
                                                            / cols**0.5)).to(device)
        H = torch.zeros(cols, cols, device=device)
        t_hu = timed(lambda: (H.zero_(), accumulate_upper(H, X)), device, reps)
        t_h = timed(lambda: (H.zero_(), accumulate(H, X)), device, reps)  # last: leaves the whole H
        with torch.no_grad():  # as the driver ran it
            t_ref = timed(lambda: ref(W, H), device, reps=1 if large else reps)
        t_new = timed(lambda: gptq(W, H), device, reps)
        t_prep = timed(lambda: prepare(H), device, reps)
        same = float((ref(W, H)[0] - gptq(W, H).weight).abs().max())
        rows_out.append({"shape": name, "rows": rows, "cols": cols, "hessian_s": t_h, "hessian_upper_s": t_hu, "textbook_s": t_ref,
                         "tarq_s": t_new, "factorize_s": t_prep, "speedup": t_ref / t_new, "max_abs_diff": same, "count": count})
    out = {"device": device, "positions": positions, "shapes": rows_out}
    if large:
        out["large_pass_textbook_s"] = sum(r["textbook_s"] * r["count"] for r in rows_out if r["count"])
        out["large_pass_tarq_s"] = sum(r["tarq_s"] * r["count"] for r in rows_out if r["count"])
    return out


def job_kernels(device: str = "cpu", rows: tuple[int, ...] = (1, 8, 128, 1500), reps: int = 5) -> dict:
    """One QuantLinear (whisper-base shapes, RTN W4G128, bias) against the float Linear it replaces, per
    path: the int4 kernel, dequantize + matmul in the input dtype, in bf16 (CPU), and the default
    dispatch; also dequantize() alone. rows = positions per call (1-8: decoding, 1500: one encoder clip)."""
    import torch
    import torch.nn.functional as F

    from tarq.qlinear import QuantLinear
    from tarq.quantizer import rtn
    from tarq.transcribe import dtype_name

    fp = torch.float16 if device.startswith("cuda") else torch.float32
    saved = QuantLinear.cpu_kernel_max_rows, QuantLinear.dense_dtype()
    paths = {"default": saved}
    if not device.startswith("cuda"):  # the CPU dispatch knobs; CUDA always takes tinygemm
        paths.update({"kernel": (None, saved[1]), "dequant": (0, None), "dequant-bf16": (0, torch.bfloat16)})
    out = []
    g = torch.Generator().manual_seed(0)
    try:
        for name, (n, k) in KERNEL_SHAPES_BASE.items():
            W, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            layer = QuantLinear.from_quantized(rtn(W, 4, 128, False), b).to(device)
            W, b = W.to(device, fp), b.to(device, fp)
            dq = timed(lambda: layer.dequantize(torch.float32), device, reps)
            for m in rows:
                x = torch.randn(m, k, generator=g).to(device, fp)
                row = {"shape": name, "rows": m, "dequantize_s": dq,
                       "float_s": timed(lambda: F.linear(x, W, b), device, reps), "paths": {}}
                with torch.no_grad():
                    for path, (max_rows, dense) in paths.items():
                        QuantLinear.cpu_kernel_max_rows, QuantLinear.cpu_dense_dtype = max_rows, dense
                        row["paths"][path] = {"seconds": timed(lambda: layer(x), device, reps), "kernel": layer.kernel}
                out.append(row)
    finally:
        QuantLinear.cpu_kernel_max_rows, QuantLinear.cpu_dense_dtype = saved
    return {"device": device, "float_dtype": dtype_name(fp), "layers": out}


def parse_method(spec: str) -> tuple[str, str, str]:
    """METHOD[:DTYPE][:ORDER] -> (method, forward dtype, sequential order), defaults from QuantConfig."""
    from tarq.config import DTYPES, ORDERS, QuantConfig

    method, *rest = spec.split(":")
    dtype, order = QuantConfig.forward_dtype, QuantConfig.sequential
    for part in rest:
        if part in DTYPES:
            dtype = part
        elif part in ORDERS:
            order = part
        else:
            raise SystemExit(f"--methods {spec}: {part!r} is neither a forward dtype ({', '.join(DTYPES)}) "
                             f"nor an order ({', '.join(ORDERS)})")
    return method, dtype, order


def job_quantize(model: str, method: str, calib: str, out_dir: str, calib_n: int, device: str = "cpu",
                 batch_size: int = 8, forward_dtype: str = "float32", sequential: str = "block") -> dict:
    """One quantize_model run: wall time, peak memory, the report's per-stage seconds and solve time."""
    from tarq.config import QuantConfig
    from tarq.pipeline import quantize_model

    shutil.rmtree(out_dir, ignore_errors=True)
    config = QuantConfig(method=method, num_samples=calib_n, batch_size=batch_size, forward_dtype=forward_dtype,
                         sequential=sequential)
    with Meter(device) as m:
        quantize_model(model, Path(calib) if method != "rtn" else None, Path(out_dir), config, device=device)
    report = json.loads((Path(out_dir) / "tarq_report.json").read_text())
    stages = dict(report.get("seconds") or {})
    # the report is written before the save finishes: what the stages leave of the wall time is the save
    stages.setdefault("save", m.seconds - sum(stages.values()))
    stages.update(report.get("quantize_seconds") or {})
    return {"model": Path(model).name, "method": method, "calib_n": calib_n if method != "rtn" else 0,
            "forward_dtype": report.get("forward_dtype"), "sequential": sequential, "seconds": m.seconds, "peak_rss_mb": m.peak_rss,
            "rss_start_mb": m.rss_start, "peak_cuda_mb": m.peak_cuda, "stages": stages, "artifact": out_dir}


def tensor_bytes(model) -> int:
    """Bytes of parameters and buffers, each storage once (tied embeddings count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device.type, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def quantized_layer_bytes(model, fp_bytes_per_weight: int) -> dict:
    """Bytes of the QuantLinear layers as stored (packed codes, scales, zeros, bias) against the same
    layers as float Linear weights + bias, and the kernel layouts built at run time (a second copy)."""
    from tarq.qlinear import QuantLinear

    q = fp = cache = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            q += sum(t.numel() * t.element_size() for t in list(mod.buffers()) + list(mod.parameters()))
            bias = mod.out_features * fp_bytes_per_weight if mod.bias is not None else 0
            fp += mod.out_features * mod.in_features * fp_bytes_per_weight + bias
            for packed, sz in mod._cache.values():
                cache += packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    return {"int4_linear_bytes": q, "fp_linear_bytes": fp, "kernel_cache_bytes": cache}


def time_split(model):
    """Forward hooks timing, on CPU, where transcription spends its time: the encoder, the decoder's
    Linear / QuantLinear layers, the output projection (proj_out: tied to the token embeddings, float in
    every variant) and the rest (attention, norms, generate's own work). Returns (seconds, remove);
    "rest" is filled in by the caller from the wall time."""
    from torch import nn

    from tarq.qlinear import QuantLinear

    seconds: dict[str, float] = {"encoder": 0.0, "decoder layers": 0.0, "proj_out": 0.0}
    started: dict[int, float] = {}
    handles = []

    def watch(module, part):
        def pre(mod, _args):
            started[id(mod)] = time.perf_counter()

        def post(mod, _args, _out):
            seconds[part] += time.perf_counter() - started.pop(id(mod))

        handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    watch(model.model.encoder, "encoder")
    watch(model.proj_out, "proj_out")
    for m in model.model.decoder.modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            watch(m, "decoder layers")
    return seconds, lambda: [h.remove() for h in handles]


def clips(audio_dir: str, n: int) -> list[str]:
    from tarq.audio import list_audio

    files = [str(p) for p in list_audio(Path(audio_dir))][:n]
    if not files:
        raise SystemExit(f"no audio files in {audio_dir}")
    return files


def job_transcribe(source: str, variant: str, files: list[str], device: str = "cpu",
                   batch_sizes: tuple[int, ...] = (1, 8), max_new_tokens: int | None = None,
                   rtn_in_memory: bool = False) -> dict:
    """Real-time factor and peak memory of tarq.transcribe.transcribe_batch (greedy, English, no
    timestamps) on `files`. variant: "fp32"/"fp16"/"bf16" (a float model folder, cast to that dtype) or
    "int4" / "int4-dequant" / "int4-bf16" (a tarq artifact; -dequant forces the dequantize+matmul path on
    CPU to show the kernel's share; -bf16 casts the rest of the model (attention, norms, embeddings,
    scales) to bf16).
    `max_new_tokens` caps decoding (random-weight test models never say EOS); None keeps the model's.
    `rtn_in_memory`: `source` is a float model folder, quantized here by RTN (int4 speed does not depend
    on how the codes were found; this needs no calibration, artifact or wordfreq)."""
    import torch

    from tarq.audio import SAMPLE_RATE, load_audio
    from tarq.qlinear import QuantLinear

    audios = [load_audio(f) for f in files]
    seconds_audio = sum(len(a) for a in audios) / SAMPLE_RATE
    fp_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if variant == "bf16":
        fp_dtype = torch.bfloat16  # the float model cast whole: what bf16 compute alone buys
    saved_max_rows = QuantLinear.cpu_kernel_max_rows
    if variant == "int4-dequant":
        QuantLinear.cpu_kernel_max_rows = 0  # every call takes dequantize + matmul; restored below
    try:
        return _transcribe(source, variant, audios, seconds_audio, fp_dtype, device, batch_sizes,
                           max_new_tokens, rtn_in_memory)
    finally:
        QuantLinear.cpu_kernel_max_rows = saved_max_rows


def _transcribe(source, variant, audios, seconds_audio, fp_dtype, device, batch_sizes, max_new_tokens,
                rtn_in_memory) -> dict:
    import torch

    from tarq.qlinear import counting_kernels
    from tarq.transcribe import transcribe_batch

    with Meter(device) as load_m:
        if variant.startswith("int4") and rtn_in_memory:
            from tarq.models.loader import load_whisper

            model, processor = load_whisper(source, device=device)
            model = rtn_int4(model.to(fp_dtype))
        elif variant.startswith("int4"):
            from tarq.artifact import load_artifact

            model, processor = load_artifact(source, device=device)
            if device.startswith("cuda"):
                model = model.to(fp_dtype)  # activations fp16 as for the float model; tinygemm runs bf16 inside
        else:
            from tarq.models.loader import load_whisper

            model, processor = load_whisper(source, device=device)
            model = model.to(fp_dtype)
        if variant == "int4-bf16":
            model = model.to(torch.bfloat16)  # everything outside the int4 layers in bf16 too
        model.eval()
    if max_new_tokens is not None:
        model.generation_config.max_new_tokens = max_new_tokens
    with counting_kernels(model) as warm_counts:
        transcribe_batch(model, processor, audios[:1], batch_size=1)  # warm-up: kernel layouts, allocator
    runs = {}
    texts = None
    for bs in batch_sizes:
        with counting_kernels(model) as counts:
            with Meter(device) as m:
                texts = transcribe_batch(model, processor, audios, batch_size=bs)
        tokens = sum(len(processor.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
        runs[str(bs)] = {"seconds": m.seconds, "rtf": m.seconds / seconds_audio, "tokens": tokens,
                         "peak_rss_mb": m.peak_rss, "peak_cuda_mb": m.peak_cuda, "kernels": counts}
    split = None
    if not device.startswith("cuda"):  # hooks time CPU work only: on CUDA they would time kernel launches
        # one more pass at batch 1, apart from the timed runs (the hooks cost a little per call)
        seconds, remove = time_split(model)
        start = time.perf_counter()
        transcribe_batch(model, processor, audios, batch_size=1)
        wall = time.perf_counter() - start
        remove()
        split = {**seconds, "rest": wall - sum(seconds.values()), "wall": wall}
    out = {"model": Path(source).name, "variant": variant + (" (RTN in memory)" if rtn_in_memory else ""),
           "device": device, "clips": len(audios),
           "audio_seconds": seconds_audio, "load_seconds": load_m.seconds, "runs": runs,
           "model_bytes": tensor_bytes(model), "warmup_kernels": warm_counts,
           "texts": texts, "time_split": split}
    if variant.startswith("int4"):
        out.update(quantized_layer_bytes(model, torch.finfo(fp_dtype).bits // 8))
    return out


def random_whisper(device: str, dtype, shape: dict | None = None):
    """A Whisper with random weights (whisper-large-v3's shapes by default) and an English-only
    generation config, built on `device`."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    gen = GenerationConfig.from_pretrained(FIXTURE_GENERATION)
    cfg = WhisperConfig(**(shape or LARGE_V3), decoder_start_token_id=gen.decoder_start_token_id,
                        bos_token_id=gen.bos_token_id, eos_token_id=gen.eos_token_id,
                        pad_token_id=gen.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = WhisperForConditionalGeneration(cfg).to(dtype).eval()
    model.generation_config = gen
    return model


def rtn_int4(model, group_size: int = 128):
    """A copy of `model` with every Linear the driver quantizes replaced by a round-to-nearest W4 QuantLinear."""
    import torch

    from tarq.models import whisper
    from tarq.qlinear import replace_linears
    from tarq.quantizer import rtn

    qmodel = copy.deepcopy(model)
    with torch.inference_mode():
        quantized = {name: rtn(qmodel.get_submodule(name).weight.data, 4, group_size, False)
                     for name in whisper.quantizable_names(qmodel)}
    return replace_linears(qmodel, quantized).eval()


def job_random_large(device: str = "cuda", variant: str = "eager", tokens: int = 64,
                     batch_sizes: tuple[int, ...] = (1, 8), reps: int = 2, shape: dict | None = None,
                     compile_backend: str = "inductor", models: tuple[str, ...] = ("fp", "int4")) -> dict:
    """Encoder time and decoder time per token, float (fp16 on GPU, fp32 on CPU) vs RTN int4, on a
    random-weight model with large-v3 shapes. Exactly `tokens` tokens per clip (EOS suppressed) so both
    models decode the same length. variant "compiled": static KV cache + torch.compile(reduce-overhead)
    of the decoder step (CUDA graphs), the way to get below eager's launch-bound floor
    (`compile_backend` "eager" only traces: a cheap check of the compiled path without codegen).
    `models` picks which of the two are timed (the compiled variant runs each in its own process, so a
    slow compile of one cannot take the other's numbers with it)."""
    import torch

    from tarq.transcribe import dtype_name

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    fp = random_whisper(device, dtype, shape)
    q = rtn_int4(fp)
    build_s = time.perf_counter() - t0
    cfg = fp.config
    results: dict = {"variant": variant, "device": device, "dtype": dtype_name(dtype),
                     "tokens": tokens, "build_seconds": build_s, "random_weights": True,
                     "shape": {k: getattr(cfg, k) for k in ("d_model", "encoder_layers", "decoder_layers",
                                                              "decoder_ffn_dim", "vocab_size")},
                     "fp_bytes": tensor_bytes(fp), "int4_bytes": tensor_bytes(q),
                     **quantized_layer_bytes(q, torch.finfo(dtype).bits // 8), "models": {}}
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    for name, model in (("fp", fp), ("int4", q)):
        if name not in models:
            continue
        try:
            results["models"][name] = _time_generate(model, variant, tokens, batch_sizes, reps, device, dtype,
                                                      compile_backend)
        except Exception as e:  # noqa: BLE001 -- e.g. torch.compile refusing a graph: report, keep the other
            results["models"][name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
    return results


def job_large_quantize(device: str = "cuda", method: str = "tarq", clips: int = 128, tokens: int = 48,
                       batch_size: int = 8, shape: dict | None = None, tail_share: float = 0.07,
                       forward_dtype: str = "float32", sequential: str = "block") -> dict:
    """The sequential driver (GPTQ or TARQ, W4G128) on a random-weight model with large-v3 shapes and
    `clips` synthetic calibration clips: random log-mel features, random token sequences of `tokens // 2`
    to `tokens` positions with `tail_share` of them tagged tail. Times the driver alone (no loading,
    calibration or saving, which a real run adds); what the numbers measure is speed, never quality."""
    import torch

    from tarq.calibrate import CalibData
    from tarq.config import QuantConfig
    from tarq.sequential import Driver
    from tarq.transcribe import dtype_name

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = random_whisper(device, dtype, shape)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, tokens // 2), tokens + 1, (clips,), generator=g)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    ids = torch.randint(0, cfg.vocab_size, (clips, tokens), generator=g).masked_fill(~mask, cfg.eos_token_id)
    tail = (torch.rand(clips, tokens, generator=g) < tail_share) & mask
    feats = torch.randn(clips, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
    data = CalibData(feats.to(device, dtype), ids.to(device), mask.to(device), tail.to(device),
                     torch.zeros_like(mask, device=device),
                     torch.zeros(clips, cfg.max_source_positions, dtype=torch.bool, device=device),
                     texts=[""] * clips, names=[f"random-{i}" for i in range(clips)])
    t0 = time.perf_counter()
    # one line per block: a run stopped by a time limit still says how far it got (gpu_check keeps stdout)
    say = lambda p: print(f"  {method} {p.stage} block {p.layer}/{p.layers_total}: "
                          f"{time.perf_counter() - t0:.1f} s", flush=True)
    driver = Driver(model, QuantConfig(method=method, num_samples=clips, batch_size=batch_size,
                                       forward_dtype=forward_dtype, sequential=sequential), progress=say)
    with Meter(device) as m:
        driver.run(data)
    out = {"method": method, "sequential": sequential, "device": device, "dtype": dtype_name(dtype),
           # an fp16 model (CUDA) computes its float32 "passes" in fp16 all the same
           "forward_dtype": dtype_name(dtype if driver.forward_dtype == torch.float32 else driver.forward_dtype),
           "clips": clips,
           "tokens": int(mask.sum()), "tail_tokens": int(tail.sum()), "batch_size": batch_size,
           "encoder_batch_size": driver.encoder_batch, "random_weights": True, "seconds": m.seconds,
           "stages": {k: round(v, 3) for k, v in driver.seconds.items()}, "layers": len(driver.quantized),
           "peak_rss_mb": m.peak_rss, "peak_cuda_mb": m.peak_cuda,
           "shape": {k: getattr(cfg, k) for k in ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim")}}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _time_generate(model, variant: str, tokens: int, batch_sizes, reps: int, device: str, dtype,
                   compile_backend: str = "inductor") -> dict:
    import torch

    from tarq.qlinear import QuantLinear, counting_kernels

    cfg = model.config
    # Eager: every QuantLinear call is counted. Compiled: calls inside a graph are not (and CUDA graph
    # replays run no Python), so report the path each layer took last instead.
    if variant == "compiled":
        # transformers' own path: with a static cache, generate compiles the decoding step (not the
        # prefill) with this config; reduce-overhead = CUDA graphs.
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=False, backend=compile_backend,
                           mode="reduce-overhead" if compile_backend == "inductor" else None)
        cc._compile_all_devices = True  # also on CPU (the smoke test traces there)
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = cc
    rows = {}
    with counting_kernels(model) as eager_counts:
        for bs in batch_sizes:
            feats = torch.randn(bs, cfg.num_mel_bins, 3000, device=device, dtype=dtype)

            def encode(feats=feats):
                with torch.inference_mode():
                    model.model.encoder(feats)

            def generate(feats=feats):
                with torch.inference_mode():
                    return model.generate(feats, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                          num_beams=1, return_timestamps=False)

            t = time.perf_counter()
            out = generate()  # warm-up (and, compiled, the compilation)
            sync(device)
            first = time.perf_counter() - t
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            enc = timed(encode, device, reps)
            gen = timed(generate, device, reps, warmup=0)
            seq = out.sequences if hasattr(out, "sequences") else out
            rows[str(bs)] = {"encoder_s": enc, "generate_s": gen, "first_call_s": first,
                             "ms_per_token": 1000 * max(gen - enc, 0.0) / tokens, "sequence_length": int(seq.shape[-1]),
                             "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
                             if device.startswith("cuda") else None}
    counts = eager_counts if variant == "eager" else {}
    if variant != "eager":
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.kernel:
                counts[m.kernel + " (last, per layer)"] = counts.get(m.kernel + " (last, per layer)", 0) + 1
    return {"runs": rows, "kernels": counts, "compiled": hasattr(model, "_compiled_call")}


JOBS = {"solver": job_solver, "kernels": job_kernels, "quantize": job_quantize, "transcribe": job_transcribe,
        "random_large": job_random_large, "large_quantize": job_large_quantize}


def run_job(kind: str, isolate: bool, timeout: float | None = None, **kwargs) -> dict:
    """Run a job here, or in a fresh Python process (its own peak memory, its own failure)."""
    if not isolate:
        try:
            return JOBS[kind](**kwargs)
        except Exception as e:  # noqa: BLE001 -- a failed measurement is reported, the run goes on
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", **kwargs}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", json.dumps({"kind": kind, **kwargs})]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", **kwargs}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(JOB_MARK):
            return json.loads(line[len(JOB_MARK):])
    last = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {p.returncode}: {last}", **kwargs}


# ---------------------------------------------------------------------------------------------
# Report


def f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def report_solver(res: dict) -> list[str]:
    if "error" in res:
        return [f"GPTQ solver benchmark failed: {res['error']}"]
    lines = [f"### GPTQ solve per layer group ({res['device']}; random W, H from {res['positions']} positions)", ""]
    lines += table(["W [rows x cols]", "H = XᵀX ms", "upper stripes ms", "textbook loop ms", "tarq.gptq ms", "of which factorizing H ms",
                    "speed-up", "max abs diff"],
                   [[r["shape"], f(1000 * r["hessian_s"], "{:.1f}"),
                     f(1000 * r.get("hessian_upper_s", float("nan")), "{:.1f}"), f(1000 * r["textbook_s"], "{:.0f}"),
                     f(1000 * r["tarq_s"], "{:.0f}"), f(1000 * r.get("factorize_s", float("nan")), "{:.0f}"),
                     f(r["speedup"], "{:.2f}x"), f(r["max_abs_diff"], "{:.1e}")]
                    for r in res["shapes"]])
    lines += ["", "Upper stripes: `tarq.gptq.accumulate_upper`, the products on and above the diagonal blocks, "
                  "which is how the driver accumulates H.", "",
              "Factorizing H (damp, Cholesky, inverse, Cholesky: `tarq.gptq.prepare`) is O(cols³) and does not "
                  "depend on W: solves that share H can share it (`gptq(..., prepared=...)`)."]
    if "large_pass_tarq_s" in res:
        lines += ["", f"One GPTQ pass over all whisper-large-v3 Linear groups (sum of the large rows times their "
                      f"count): textbook {res['large_pass_textbook_s']:.1f} s, tarq.gptq {res['large_pass_tarq_s']:.1f} s "
                      "(TARQ needs two passes per layer)."]
    return lines


def report_kernels(res: dict) -> list[str]:
    if "error" in res:
        return [f"QuantLinear kernel benchmark failed: {res['error']}"]
    paths = list(res["layers"][0]["paths"]) if res["layers"] else []
    lines = [f"### One quantized layer per path ({res['device']}; whisper-base shapes, W4G128 + bias; "
             f"speed-up against the {res['float_dtype']} Linear it replaces)", ""]
    lines += table(["layer [out x in]", "rows", f"{res['float_dtype']} Linear ms", "dequantize() ms"]
                   + [f"{p} ms (speed-up)" for p in paths] + ["default takes"],
                   [[r["shape"], str(r["rows"]), f(1000 * r["float_s"], "{:.3f}"), f(1000 * r["dequantize_s"], "{:.2f}")]
                    + [f"{1000 * r['paths'][p]['seconds']:.3f} ({r['float_s'] / r['paths'][p]['seconds']:.2f}x)"
                       for p in paths] + [r["paths"]["default"]["kernel"]]
                    for r in res["layers"]])
    lines += ["", "kernel: the int4 kernel at any row count; dequant: dequantize + matmul in the input dtype; "
                  "dequant-bf16: the same in bf16; default: what QuantLinear picks (the int4 kernel up to "
                  "`cpu_kernel_max_rows` rows, then dequantize + matmul, in bf16 where bf16 pays on this CPU)."]
    return lines


def default_order() -> str:
    from tarq.config import QuantConfig

    return QuantConfig.sequential


def is_default_order(row: dict) -> bool:
    return row.get("sequential", "block") == default_order()


def report_quant(rows: list[dict]) -> list[str]:
    lines = ["### Quantization (W4G128)", ""]
    out, stage_rows = [], []
    for r in rows:
        if "error" in r:
            out.append([Path(r.get("model", "?")).name, r.get("method", "?"), "failed: " + r["error"]] + ["-"] * 7)
            continue
        base = next((b for b in rows if b.get("model") == r["model"] and b.get("method") == "gptq"
                     and b.get("forward_dtype") in ("float32", None) and is_default_order(b) and "error" not in b),
                    None)
        out.append([r["model"], r["method"], r.get("forward_dtype") or "-", r.get("sequential", "block"),
                    str(r["calib_n"]),
                    f(r["seconds"], "{:.1f}"),
                    ratio(r["seconds"], base and base["seconds"]), f(r["peak_rss_mb"], "{:.0f}"),
                    ratio(r["peak_rss_mb"], base and base["peak_rss_mb"]), f(r["peak_cuda_mb"], "{:.0f}")])
        st = r["stages"]
        inner = [st.get(k) for k in ("forward", "statistics", "solve")]
        other = st["quantize"] - sum(inner) if st.get("quantize") is not None and None not in inner else None
        stage_rows.append([r["model"], r["method"], r.get("forward_dtype") or "-", r.get("sequential", "block")]
                          + [f(st.get(k), "{:.1f}") for k in ("load", "calibrate", "quantize")]
                          + [f(v, "{:.1f}") for v in (*inner, other)]
                          + [f(st.get("forward") and st["quantize"] / st["forward"]), f(st.get("save"), "{:.1f}")])
    lines += table(["model", "method", "passes", "order", "clips", "wall s", "vs GPTQ", "peak RSS MiB", "vs GPTQ",
                    "peak CUDA MiB"], out)
    lines += ["", "passes: what the calibration forward passes computed in (`--forward-dtype`; Hessians and solves "
                  "are float32 in every row); order: `--sequential` (block: every group of a block on inputs "
                  f"captured before any of it is quantized; layer: each group after the ones before it); vs GPTQ: "
                  f"against GPTQ with float32 passes and the default order ({default_order()}).", "",
              "Per stage (seconds, from tarq_report.json). Inside quantize: forward = the block forward passes "
                  "over the calibration set (block order: GPTQ two per block, TARQ three, its full-precision "
                  "stream; layer order: one per stream, GPTQ one, TARQ two), statistics "
                  "= Hessians and drift, solve = the GPTQ / TARQ solves; quantize / forward says how close the run "
                  "is to the cost of its forward passes:", ""]
    lines += table(["model", "method", "passes", "order", "load", "calibrate", "quantize", "forward", "statistics", "solve",
                    "other", "quantize / forward", "save"], stage_rows)
    return lines


def report_transcribe(rows: list[dict]) -> list[str]:
    lines = ["### Transcription (greedy, English, no timestamps; the same clips for every variant)", "",
             "texts = float's: clips whose text (from the last batch size) is the float baseline's, word for word.",
             ""]
    out, sizes = [], []
    for r in rows:
        if "error" in r:
            out.append([Path(r.get("source", "?")).name, r.get("variant", "?"), "failed: " + r["error"]] + ["-"] * 7)
            continue
        base = next((b for b in rows if b.get("model") and b.get("device") == r["device"] and "error" not in b
                     and b["variant"] in ("fp32", "fp16") and b["model"] == r.get("base_model", r["model"])), None)
        same = "-"
        if base and base.get("texts") and r.get("texts"):
            same = f"{sum(a == b for a, b in zip(r['texts'], base['texts']))} / {len(base['texts'])}"
        for bs, run in r["runs"].items():
            brun = base["runs"].get(bs) if base else None
            out.append([r.get("base_model", r["model"]), r["variant"], bs, f"{r['clips']} / {r['audio_seconds']:.0f} s",
                        f(run["rtf"], "{:.3f}"), ratio(brun and brun["seconds"], run["seconds"]),
                        f(1000 * run["seconds"] / max(run["tokens"], 1), "{:.0f}"),
                        f(run["peak_rss_mb"], "{:.0f}"), f(run["peak_cuda_mb"], "{:.0f}"), same,
                        ", ".join(f"{k}: {v}" for k, v in sorted(run["kernels"].items())) or "-"])
        if "int4_linear_bytes" in r:
            sizes.append([r.get("base_model", r["model"]), r["variant"],
                          f(r["int4_linear_bytes"] / 2**20, "{:.1f}"), f(r["fp_linear_bytes"] / 2**20, "{:.1f}"),
                          ratio(r["int4_linear_bytes"], r["fp_linear_bytes"]),
                          f(r["model_bytes"] / 2**20, "{:.1f}"),
                          f(base["model_bytes"] / 2**20, "{:.1f}") if base else "-",
                          ratio(r["model_bytes"], base and base["model_bytes"]),
                          f(r["kernel_cache_bytes"] / 2**20, "{:.1f}")])
    lines += table(["model", "variant", "batch", "clips / audio", "RTF", "speed-up vs float", "ms / output token",
                    "peak RSS MiB", "peak CUDA MiB", "texts = float's", "QuantLinear calls by kernel"], out)
    splits = [r for r in rows if "error" not in r and r.get("time_split")]
    if splits:
        lines += ["", "Where batch-1 transcription spends its time (CPU; one more pass over the same clips with "
                      "forward hooks; seconds and share of that pass). proj_out is the output projection onto the "
                      "vocabulary, tied to the token embeddings and float in every variant:", ""]
        parts = ["encoder", "decoder layers", "proj_out", "rest"]
        lines += table(["model", "variant", "wall s"] + parts,
                       [[r.get("base_model", r["model"]), r["variant"], f(r["time_split"]["wall"], "{:.1f}")]
                        + [f"{r['time_split'][k]:.2f} ({100 * r['time_split'][k] / r['time_split']['wall']:.0f}%)"
                           for k in parts] for r in splits])
    if sizes:
        lines += ["", "Weight memory (MiB): quantized Linear layers as stored vs the same layers in float; whole "
                      "model (parameters + buffers, embeddings stay float); kernel layouts built at run time:", ""]
        lines += table(["model", "variant", "int4 layers", "float layers", "ratio", "int4 model", "float model",
                        "ratio", "kernel cache"], sizes)
    return lines


def report_large(rows: list[dict]) -> list[str]:
    lines = ["### whisper-large-v3 shapes, RANDOM weights (speed only), RTN int4", ""]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r.get("variant", "?"), "failed: " + r["error"]] + ["-"] * 7)
            continue
        fp = r["models"].get("fp", {}).get("runs", {})
        for name, m in r["models"].items():
            if "error" in m:
                out.append([r["variant"], name, "failed: " + m["error"]] + ["-"] * 6)
                continue
            for bs, run in m["runs"].items():
                label = f"{name} ({r['dtype']})" if name == "fp" else "int4"
                if r["variant"] == "compiled" and not m.get("compiled"):
                    label += " (compile did not engage: static cache, eager)"
                out.append([r["variant"], label, bs,
                            f(1000 * run["encoder_s"], "{:.1f}"), f(run["ms_per_token"], "{:.2f}"),
                            ratio(fp.get(bs, {}).get("ms_per_token"), run["ms_per_token"]),
                            f(1000 * run["generate_s"], "{:.0f}"), f(run["first_call_s"], "{:.1f}"),
                            ", ".join(f"{k}: {v}" for k, v in sorted(m["kernels"].items())) or "-"])
    ok = next((r for r in rows if "error" not in r), None)
    if ok:
        lines.append(f"Device {ok.get('gpu', ok['device'])}; {ok['tokens']} tokens per clip (EOS suppressed); "
                     f"model bytes float {ok['fp_bytes'] / 2**30:.2f} GiB, int4 {ok['int4_bytes'] / 2**30:.2f} GiB "
                     f"(quantized layers {ratio(ok['int4_linear_bytes'], ok['fp_linear_bytes'])} of float). "
                     "Decoder ms/token = (generate - encoder) / tokens.")
        lines.append("")
    lines += table(["variant", "model", "batch", "encoder ms", "decoder ms / token", "decoder speed-up vs float",
                    "generate ms", "first call s", "QuantLinear calls by kernel"], out)
    return lines


def report_large_quantize(rows: list[dict]) -> list[str]:
    lines = ["### Quantizing whisper-large-v3 shapes, RANDOM weights and calibration data (speed only)", ""]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r.get("method", "?"), "failed: " + r["error"]] + ["-"] * 11)
            continue
        base = next((b for b in rows if b.get("method") == "gptq" and "error" not in b and is_default_order(b)
                     and b.get("forward_dtype", b["dtype"]) == b["dtype"]), None)
        st = r["stages"]
        inner = [st.get(k) for k in ("forward", "statistics", "solve")]
        out.append([r["method"], r.get("forward_dtype", r["dtype"]), r.get("sequential", "block"),
                    f"{r['clips']} ({r['tokens']} tokens, {r['tail_tokens']} tail)",
                    f(r["seconds"], "{:.1f}"), ratio(r["seconds"], base and base["seconds"]),
                    *(f(v, "{:.1f}") for v in inner),
                    f(r["seconds"] - sum(v or 0 for v in inner), "{:.1f}"),
                    f(r["peak_cuda_mb"], "{:.0f}"), f(r["peak_rss_mb"], "{:.0f}"), str(r["encoder_batch_size"])])
    ok = next((r for r in rows if "error" not in r), None)
    if ok:
        lines += [f"Device {ok.get('gpu', ok['device'])} ({ok['dtype']}); the sequential driver alone: a real run adds "
                  "loading, calibration (features, tagging, pseudo-labels for clips without transcripts) and "
                  "saving.", ""]
    lines += table(["method", "passes", "order", "clips", "wall s", "vs GPTQ", "forward s", "statistics s", "solve s",
                    "other s", "peak CUDA MiB", "peak RSS MiB", "encoder batch"], out)
    return lines


def environment(device: str) -> str:
    import torch

    from tarq.qlinear import QuantLinear, cpu_bf16_flags, cpu_bf16_probe

    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        isa = "AMX-BF16" if caps.get("amx_bf16") else "AVX512-BF16" if cpu_bf16_flags() else \
            "AVX-512, no bf16" if caps.get("avx512_f") else "AVX2, no AVX-512" if caps.get("avx2") else "?"
        dense = QuantLinear.dense_dtype()
        probe = cpu_bf16_probe()
        dev = (f"CPU {caps.get('cpu_name') or platform.processor() or platform.machine()} ({isa}), "
               f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; int4 dequant path computes "
               f"in {str(dense).replace('torch.', '') if dense else 'the input dtype'}"
               + ("" if probe is None else f" (bf16 matmul probe: {probe:.2f}x float32)"))
    try:
        load = ", load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        load = ""
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {dev}{load}; torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en,whisper-base",
                    help="cached short names (tarq.hub.pull) or model folders")
    ap.add_argument("--methods", default="rtn,gptq,tarq",
                    help="comma list of rtn, gptq, tarq; METHOD:DTYPE runs the calibration passes in DTYPE "
                         "(float32, bfloat16, float16, auto; default float32), METHOD:ORDER in that --sequential "
                         "order (block, layer), e.g. tarq:bfloat16, tarq:layer, tarq:bfloat16:layer")
    ap.add_argument("--calib", type=Path, default=SPEECH / "ljspeech-385")
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--audio", type=Path, default=SPEECH / "commonvoice-en-100", help="clips to transcribe")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", default="solver,quantize,transcribe",
                    help="comma list of solver, kernels (one QuantLinear per path), quantize, transcribe, large, "
                         "large-quantize (the driver on large-v3 shapes: --methods, --calib-n clips)")
    ap.add_argument("--random-large", action="store_true", help="add the large-v3-shaped random-weight benchmark")
    ap.add_argument("--compiled", action="store_true", help="with --random-large: also static cache + torch.compile")
    ap.add_argument("--large-variants", default=None, help="comma list of eager, compiled (overrides --compiled)")
    ap.add_argument("--tokens", type=int, default=64,
                    help="--random-large: tokens decoded per clip; large-quantize: at most this many per clip")
    ap.add_argument("--large-shape", type=json.loads, default=None,
                    help="--random-large, large-quantize: WhisperConfig fields as JSON instead of large-v3's "
                         "(smoke tests)")
    ap.add_argument("--solver-only", action="store_true", help="only the GPTQ solver micro-benchmark")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny.en, 2 clips, batch 1 and 2")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false", help="run every job in this process")
    ap.add_argument("--job-timeout", type=float, default=3600, help="seconds per measurement process")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-speed")
    ap.add_argument("--out", type=Path, default=None, help="report path (default bench/results/speed.md)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.job:  # a child process: one job, one result line
        spec = json.loads(args.job)
        print(JOB_MARK + json.dumps(JOBS[spec.pop("kind")](**spec)), flush=True)
        return {}

    parts = set(args.parts.split(","))
    if args.random_large:
        parts.add("large")
    if args.solver_only:
        parts = {"solver"}
    if args.quick:
        args.models, args.calib_n, args.clips, args.batch_sizes = "whisper-tiny.en", 2, 2, "1,2"
        args.tokens = min(args.tokens, 8)
    out = args.out or RESULTS / ("speed-quick.md" if args.quick else "speed.md")
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    results: dict = {"command": "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "environment": environment(args.device)}
    say = lambda msg: print(msg, flush=True)  # noqa: E731

    if "kernels" in parts:
        say("QuantLinear kernels ...")
        results["kernels"] = run_job("kernels", args.isolate, args.job_timeout, device=args.device,
                                     reps=2 if args.quick else 5)
    if "solver" in parts:
        say("solver micro-benchmark ...")
        results["solver"] = run_job("solver", args.isolate, args.job_timeout, device=args.device,
                                    large=args.device.startswith("cuda"), reps=1 if args.quick else 3)
    if parts & {"quantize", "transcribe"}:
        from tarq.hub import pull
        from tarq.qlinear import QuantLinear

        results["quantize"], results["transcribe"] = [], []
        fp_variant = "fp16" if args.device.startswith("cuda") else "fp32"
        for name in args.models.split(","):
            model_dir = str(Path(name)) if Path(name).is_dir() else str(pull(name))
            label = Path(model_dir).name
            artifacts = {}
            if "quantize" in parts:
                for spec in args.methods.split(","):
                    method, dtype, order = parse_method(spec)
                    say(f"quantize {label} {spec} ...")
                    r = run_job("quantize", args.isolate, args.job_timeout, model=model_dir, method=method,
                                calib=str(args.calib), out_dir=str(args.work / f"{label}-{spec.replace(':', '-')}"),
                                calib_n=args.calib_n, device=args.device, forward_dtype=dtype, sequential=order)
                    results["quantize"].append(r)
                    if "error" not in r:
                        artifacts.setdefault(method, r["artifact"])
            if "transcribe" in parts:
                # int4: the TARQ artifact of this run; with no quantization in this run, RTN in memory
                # (int4 speed is blind to how the codes were found)
                int4 = artifacts.get("tarq") or next(iter(artifacts.values()), None)
                files = clips(str(args.audio), args.clips)
                variants = [(model_dir, fp_variant, False), (int4 or model_dir, "int4", int4 is None)]
                if not args.device.startswith("cuda"):
                    variants.append((int4 or model_dir, "int4-dequant", int4 is None))
                    if QuantLinear.dense_dtype() is not None:
                        # int4 computes in bf16 on this CPU: show what a float model in bf16 does, and
                        # the int4 model with the rest of the network in bf16 as well
                        variants += [(model_dir, "bf16", False), (int4 or model_dir, "int4-bf16", int4 is None)]
                for source, variant, in_memory in variants:
                    say(f"transcribe {label} {variant} ...")
                    r = run_job("transcribe", args.isolate, args.job_timeout, source=source, variant=variant,
                                files=files, device=args.device, batch_sizes=batch_sizes,
                                rtn_in_memory=in_memory)
                    r["base_model"] = label
                    r.setdefault("model", Path(source).name)
                    r.setdefault("device", args.device)
                    results["transcribe"].append(r)
    if "large" in parts:
        results["large"] = []
        variants = args.large_variants.split(",") if args.large_variants else \
            ["eager"] + (["compiled"] if args.compiled else [])
        for variant in variants:
            say(f"random large-v3 shapes, {variant} ...")
            # compiled: one process per model, each within its own --job-timeout
            groups = [["fp"], ["int4"]] if variant == "compiled" else [["fp", "int4"]]
            merged: dict = {"variant": variant, "models": {}}
            for models in groups:
                r = run_job("random_large", args.isolate, args.job_timeout, device=args.device, variant=variant,
                            tokens=args.tokens, batch_sizes=batch_sizes, models=models, shape=args.large_shape)
                if "error" in r:
                    merged["models"].update({m: {"error": r["error"]} for m in models})
                else:
                    merged.update({k: v for k, v in r.items() if k != "models"})
                    merged["models"].update(r["models"])
            if "fp_bytes" not in merged:  # no job came back
                merged["error"] = "; ".join(sorted({m["error"] for m in merged["models"].values()}))
            results["large"].append(merged)

    if "large-quantize" in parts:
        results["large_quantize"] = []
        for spec in (m for m in args.methods.split(",") if m.partition(":")[0] != "rtn"):
            method, dtype, order = parse_method(spec)
            say(f"quantize random large-v3 shapes, {spec}, {args.calib_n} clips ...")
            r = run_job("large_quantize", args.isolate, args.job_timeout, device=args.device, method=method,
                        clips=args.calib_n, tokens=args.tokens, shape=args.large_shape,
                        forward_dtype=dtype, sequential=order)
            results["large_quantize"].append(r)

    write_report(results, out)
    say(out.read_text())
    return results


def write_report(results: dict, out: Path) -> None:
    lines = ["# Speed and memory", "", f"Command: `{results['command'].strip()}`", "",
             f"Run: {results['environment']}.", "",
             "Every ratio is against a baseline measured in the same run; timings are wall clock on a possibly "
             "busy machine."]
    if "solver" in results:
        lines += [""] + report_solver(results["solver"])
    if "kernels" in results:
        lines += [""] + report_kernels(results["kernels"])
    if results.get("quantize"):
        lines += [""] + report_quant(results["quantize"])
    if results.get("transcribe"):
        lines += [""] + report_transcribe(results["transcribe"])
    if results.get("large"):
        lines += [""] + report_large(results["large"])
    if results.get("large_quantize"):
        lines += [""] + report_large_quantize(results["large_quantize"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    slim = copy.deepcopy(results)
    for r in slim.get("transcribe", []):
        r.pop("texts", None)
    out.with_suffix(".json").write_text(json.dumps(slim, indent=1, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
