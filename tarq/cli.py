"""The `tarq` command line: quantize, transcribe, eval, models, serve, worker, remote.

Errors a user can cause print one line and exit non-zero; tracebacks are for bugs."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import DTYPES, ORDERS, QuantConfig
from .errors import TarqError


ML_MODULES = {"torch", "transformers", "safetensors", "compressed_tensors", "wordfreq", "jiwer", "tokenizers"}


class TarqGroup(click.Group):
    """Turns TarqError (and bad settings) from any subcommand into one clear line and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TarqError as e:
            raise click.ClickException(str(e)) from None
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ML_MODULES:
                raise click.ClickException(f"this command needs {e.name}: pip install 'tarq[ml]'") from None
            raise
        except ValueError as e:
            if type(e) is ValueError:  # our own validation; subclasses from libraries are bugs
                raise click.ClickException(str(e)) from None
            if type(e).__module__.startswith("pydantic") and getattr(e, "title", "") == "Settings":
                raise click.ClickException(_settings_error(e)) from None
            raise


def _settings_error(e) -> str:
    """A rejected TARQ_ environment variable, named as the user set it."""
    bad = [f"TARQ_{'_'.join(map(str, err['loc'])).upper()}={err.get('input')!r}: {err['msg']}" for err in e.errors()]
    return "bad setting " + "; ".join(bad)


@click.group(cls=TarqGroup)
@click.version_option(package_name="tarq")
def main() -> None:
    """Tail-aware 4-bit quantization of speech recognition models."""


@main.command()
@click.argument("model")
@click.option("--calib", type=click.Path(path_type=Path), help="Folder of calibration audio (+ transcripts.tsv).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write the artifact to.")
@click.option("--method", type=click.Choice(["tarq", "gptq", "rtn"]), default="tarq", show_default=True)
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True)
@click.option("--sym/--asym", default=False, show_default=True, help="Symmetric grid or uint + zero point.")
@click.option("--num-samples", type=click.IntRange(1), default=128, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--encoder-tagging", type=click.Choice(["common", "frames"]), default="common", show_default=True)
@click.option("--no-rarebal", is_flag=True, help="TARQ without RAREBAL (ablation).")
@click.option("--no-residual", is_flag=True, help="TARQ without the residual correction (ablation).")
@click.option("--residual-step", type=click.Choice(["paper", "full"]), default="paper", show_default=True,
              help="paper: alpha from TARQ.md; full: alpha = 1 (the least-squares target; an experiment).")
@click.option("--sequential", type=click.Choice(ORDERS), default=QuantConfig.sequential, show_default=True,
              help="layer: capture each group's inputs after the groups before it in the block are quantized "
                   "(one pass per block and stream: faster, more memory).")
@click.option("--act-order", is_flag=True)
@click.option("--zipf-threshold", type=click.FloatRange(0, 8, min_open=True), default=QuantConfig.zipf_threshold,
              show_default=True, help="TARQ: a word is rare below this wordfreq Zipf frequency (3: under one use "
                                      "per million words).")
@click.option("--lambda-cost", type=click.FloatRange(0, min_open=True), default=QuantConfig.lambda_cost,
              show_default=True, help="TARQ: c in lambda = c tr(Hc) / tr(Ht).")
@click.option("--digits-lookup", is_flag=True, help="TARQ: look words with digits up in wordfreq (default: all rare).")
@click.option("--lambda-positions", type=click.Choice(["all", "text"]), default=QuantConfig.lambda_positions,
              show_default=True, help="TARQ: the common positions lambda's tr(Hc) counts (text: not the prompt's "
                                      "special tokens; an experiment, see README).")
@click.option("--forward-dtype", type=click.Choice(DTYPES), default=QuantConfig.forward_dtype, show_default=True,
              help="What the calibration forward passes compute in (Hessians and solves stay float32); auto: "
                   "float16 on CUDA, bfloat16 on CPUs where it measures faster, else float32.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Audio + transcripts.tsv to score FP and quantized.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
def quantize(model, calib, out, method, bits, group_size, sym, num_samples, batch_size, encoder_tagging,
             no_rarebal, no_residual, residual_step, sequential, act_order, zipf_threshold, lambda_cost, digits_lookup,
             lambda_positions, forward_dtype, seed, device, eval_data, force):
    """Quantize MODEL (a Hub id or a local folder) and write a Hugging Face model folder."""
    from tqdm import tqdm

    from .pipeline import quantize_model

    if out.exists() and any(out.iterdir()) and not force:
        raise click.ClickException(f"output folder {out} is not empty (use --force to overwrite)")
    if method != "rtn" and calib is None:
        raise click.ClickException(f"--calib is required for --method {method}")
    device = _check_device(device)
    config = QuantConfig(method=method, bits=bits, group_size=group_size, sym=sym, num_samples=num_samples,
                         batch_size=batch_size, encoder_tagging=encoder_tagging, rarebal=not no_rarebal,
                         residual=not no_residual, residual_step=residual_step, sequential=sequential, act_order=act_order,
                         zipf_threshold=zipf_threshold, lambda_cost=lambda_cost, digits_are_tail=not digits_lookup,
                         lambda_positions=lambda_positions,
                         forward_dtype=forward_dtype, seed=seed)
    bar = tqdm(total=0, unit="block", file=sys.stderr, dynamic_ncols=True)

    def show(p):
        if p.layers_total and bar.total != p.layers_total:
            bar.total = p.layers_total
        bar.set_description(p.stage)
        if p.loss is not None:
            bar.set_postfix(loss=f"{p.loss:.2e}")
        bar.n = p.layer
        bar.refresh()

    try:
        path = quantize_model(model, calib, out, config, device=device, progress=show, eval_dir=eval_data)
    finally:
        bar.close()
    click.echo(str(path))


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise click.ClickException(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    return device


def _register() -> None:
    from .cli_models import models
    from .cli_remote import remote
    from .cli_serve import serve, worker
    from .cli_transcribe import eval_command, transcribe

    main.add_command(transcribe)
    main.add_command(eval_command, "eval")
    main.add_command(models)
    main.add_command(serve)
    main.add_command(worker)
    main.add_command(remote)


_register()

if __name__ == "__main__":
    main()
