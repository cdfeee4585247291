"""One quantization run end to end: load, calibrate, quantize block by block, save the artifact."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from . import __version__
from .calibrate import load_samples, prepare
from .config import QuantConfig
from .errors import CalibrationError
from .models.loader import load_whisper
from .progress import Progress, ProgressFn, StopFn
from .sequential import Driver
from .transcribe import dtype_name


def quantize_model(model: str | Path, calib: Path | None, out_dir: Path, config: QuantConfig, *,
                   device: str = "cpu", progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                   eval_dir: Path | None = None, base_model: str | None = None) -> Path:
    """Quantize `model` with `config` and write the artifact folder `out_dir`. RTN needs no `calib`.
    `base_model` is what the model card and report call the source (default: `model` as given)."""
    from .artifact import save_artifact

    report_progress = progress or (lambda p: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    report_progress(Progress("load"))
    fp_model, processor = load_whisper(model, device=device)
    timings["load"] = time.perf_counter() - t0

    data = None
    if config.method != "rtn":
        if calib is None:
            raise CalibrationError(f"{config.method} needs calibration audio (--calib)")
        t = time.perf_counter()
        report_progress(Progress("calibrate"))
        samples = load_samples(Path(calib), config.num_samples, config.seed)
        data = prepare(fp_model, processor, samples, config, device, next(fp_model.parameters()).dtype)
        timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    driver = Driver(fp_model, config, report_progress, should_stop)
    quantized = driver.run(data)
    timings["quantize"] = time.perf_counter() - t
    # a cancel that arrives during the last block still wins
    driver.check_stop()

    report = {
        "tarq_version": __version__,
        "base_model": base_model or str(model),
        "config": config.to_dict(),
        "calibration": data.info if data is not None else None,
        "transcripts": {"given": len(data) - data.pseudo_labelled, "pseudo_labelled": data.pseudo_labelled}
        if data is not None else None,
        "layers": driver.layers,
        "stream_drift": driver.stream_drift,
        # inside "quantize": block forward passes, Hessian/drift accumulation, the solves (the rest: the
        # report's per-layer losses, front ends, bookkeeping)
        "quantize_seconds": {k: round(v, 3) for k, v in driver.seconds.items()},
        "encoder_batch_size": driver.encoder_batch,
        # config.forward_dtype resolved on this device (RTN runs no pass)
        "forward_dtype": dtype_name(driver.forward_dtype) if config.method != "rtn" else None,
        "seconds": timings,
        "device": device,
        "torch": torch.__version__,
        "host": platform.machine(),
    }
    n = len(driver.blocks)
    report_progress(Progress("save", n, n))
    out = save_artifact(fp_model, quantized, processor, Path(out_dir), config=config, base_model=base_model or str(model),
                        report=report)
    if eval_dir is not None:
        from .evaluate import attach_metrics

        report_progress(Progress("evaluate", n, n))
        attach_metrics(out, model, Path(eval_dir), device=device)
    report_progress(Progress("done", n, n))
    return out
