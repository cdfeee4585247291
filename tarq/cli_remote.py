"""`tarq remote`: quantize and evaluate on a tarq server from a laptop, one command each.

A local model folder is uploaded first (POST /v1/models); clips go as one tar.gz; a job's progress events
drive a progress bar; a quantized folder is downloaded into --out, evaluations print `tarq eval`'s table.
Only the HTTP API is used (httpx), so the server can be anywhere a GPU is. Every upload and submission
carries an Idempotency-Key of its own and is sent again when the connection fails.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import click

CONNECT_TIMEOUT_S = 10.0
SUBMIT_TRIES = 3


class Remote:
    """The server's HTTP API; any refusal becomes one ClickException line with the server's message."""

    def __init__(self, server: str, key: str):
        import httpx

        self.httpx = httpx
        self.client = httpx.Client(base_url=server.rstrip("/") + "/v1", headers={"Authorization": f"Bearer {key}"},
                                   timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S))

    def submit(self, path: str, *, data: dict, files: dict | None = None) -> dict:
        """POST a submission (an upload, a quantization, an evaluation) under an Idempotency-Key of its own,
        sent again when the connection fails: if the server got it and only its answer was lost, it answers
        with what the first one made instead of doing the work twice."""
        headers = {"Idempotency-Key": f"tarq-remote-{uuid.uuid4().hex}"}
        for attempt in range(1, SUBMIT_TRIES + 1):
            for _, f, *_ in (files or {}).values():
                f.seek(0)  # a try that failed may have read some of it
            try:
                response = self.client.post(path, data=data, files=files, headers=headers)
            except self.httpx.TransportError as err:
                if attempt == SUBMIT_TRIES:
                    raise click.ClickException(f"cannot reach {self.client.base_url}: {err}") from None
                click.echo(f"{path}: {type(err).__name__}; sending it again", err=True)
                time.sleep(attempt)
                continue
            self.check(response)
            return response.json()
        raise AssertionError("the last try returns or raises")

    def check(self, response) -> None:
        if response.status_code < 400:
            return
        response.read()  # a streamed answer has not read its body yet
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        raise click.ClickException(f"server said {response.status_code}: {message}")

    def follow(self, job_id: str, bar, route: str = "quantizations") -> dict:
        """Read the job's server-sent events (under /v1/<route>) until its end; returns the final job."""
        try:
            with self.client.stream("GET", f"/{route}/{job_id}/events") as response:
                self.check(response)
                kind = None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: "):
                        job = json.loads(line[len("data: "):])
                        progress = job.get("progress") or {}
                        bar.set_description(progress.get("stage") or job["status"])
                        bar.n = round(100 * float(progress.get("fraction") or 0), 1)
                        bar.refresh()
                        if kind == "end":
                            return job
        except self.httpx.HTTPError as err:
            raise click.ClickException(f"lost the connection while following job {job_id}: {err}") from None
        raise click.ClickException(f"job {job_id}: the event stream ended before the job did")

    def download(self, model_id: str, out: Path) -> None:
        """The model's folder, fetched as one tar and unpacked into `out` (its top folder dropped)."""
        staging = Path(tempfile.mkdtemp(prefix=".tarq-download-", dir=out.parent))
        try:
            with self.client.stream("GET", f"/models/{model_id}/archive") as response:
                self.check(response)
                with open(staging / "model.tar", "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
            with tarfile.open(staging / "model.tar") as tar:
                tar.extractall(staging, filter="data")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging / model_id, out)
        except self.httpx.HTTPError as err:
            raise click.ClickException(f"lost the connection while downloading {model_id}: {err}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _tar(folder: Path, dest: Path, top: str, gz: bool) -> Path:
    with tarfile.open(dest, "w:gz" if gz else "w") as tar:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                tar.add(path, arcname=f"{top}/{path.name}")
    return dest


def _model_on_server(api: Remote, model: str, tmp: Path) -> str:
    """MODEL as the server names it: a local folder is uploaded first (its new id), anything else as given."""
    if not Path(model).is_dir():
        return model
    folder = Path(model)
    with open(_tar(folder, tmp / "model.tar", folder.name, gz=False), "rb") as f:
        uploaded = api.submit("/models", data={"name": folder.name},
                              files={"archive": ("model.tar", f, "application/x-tar")})["id"]
    click.echo(f"uploaded {folder} as {uploaded}", err=True)
    return uploaded


def _progress_bar():
    from tqdm import tqdm

    return tqdm(total=100, unit="%", bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")


@click.group()
def remote() -> None:
    """Work with a tarq server (`tarq serve`) over its HTTP API."""


@remote.command("quantize")
@click.argument("model")
@click.option("--server", envvar="TARQ_SERVER", required=True, help="Base URL, e.g. http://gpu-host:8000 "
              "(or TARQ_SERVER).")
@click.option("--key", envvar="TARQ_API_KEY", required=True, help="API key (or TARQ_API_KEY).")
@click.option("--calib", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of calibration audio (+ transcripts.tsv).")
@click.option("--method", type=click.Choice(["tarq", "gptq", "rtn"]), default="tarq", show_default=True)
@click.option("--num-samples", type=click.IntRange(1), default=None, help="Clips to use (default: the server's).")
@click.option("--set", "settings", multiple=True, metavar="FIELD=VALUE",
              help="Any other field of POST /v1/quantizations, e.g. --set zipf_threshold=4 --set sequential=layer "
                   "(the server checks it); repeat for several.")
@click.option("--out", type=click.Path(path_type=Path), help="Download the quantized folder here.")
def quantize_remote(model, server, key, calib, method, num_samples, settings, out):
    """Quantize MODEL on the server and print the new model's id. MODEL is a local Whisper folder (uploaded
    first), a model id of the server, a folder under its TARQ_MODEL_ROOTS, or a Hub id."""
    if out is not None and out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty")
    extra = {}
    for item in settings:
        field, eq, value = item.partition("=")
        if not eq or not field.strip() or field.strip() in ("model", "method", "num_samples"):
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE for a field other than model, method and "
                                     "num_samples (their own options)", param_hint="--set")
        extra[field.strip()] = value.strip()
    api = Remote(server, key)
    with tempfile.TemporaryDirectory(prefix="tarq-remote-") as tmp:
        model = _model_on_server(api, model, Path(tmp))
        form = {**extra, "model": model, "method": method}
        if num_samples is not None:
            form["num_samples"] = str(num_samples)
        if calib is not None:
            with open(_tar(calib, Path(tmp) / "calib.tar.gz", "calib", gz=True), "rb") as f:
                job = api.submit("/quantizations", data=form,
                                 files={"archive": ("calib.tar.gz", f, "application/gzip")})
        else:
            job = api.submit("/quantizations", data=form)
    click.echo(f"job {job['id']}", err=True)
    with _progress_bar() as bar:
        job = api.follow(job["id"], bar)
    if job["status"] != "succeeded":
        raise click.ClickException(f"job {job['id']} {job['status']}: {job.get('error') or 'no reason given'}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        api.download(job["model"], out)
        click.echo(f"downloaded to {out}", err=True)
    click.echo(job["model"])


@remote.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--server", envvar="TARQ_SERVER", required=True, help="Base URL (or TARQ_SERVER).")
@click.option("--key", envvar="TARQ_API_KEY", required=True, help="API key (or TARQ_API_KEY).")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of audio with transcripts.tsv (file<TAB>reference).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every result (with each clip's hypothesis) here.")
def eval_remote(models, server, key, data, json_out):
    """Score each of MODELS on the server against the references in DATA (the same clips for all: say a
    base model and its quantized versions) and print WER, rare-WER and common-WER as `tarq eval` does.
    A MODEL that is a local folder is uploaded first."""
    from tarq.evaluate import EvalResult, format_table

    if not (data / "transcripts.tsv").is_file():
        raise click.ClickException(f"{data} has no transcripts.tsv (file<TAB>reference) to score against")
    api = Remote(server, key)
    submitted = []
    with tempfile.TemporaryDirectory(prefix="tarq-remote-") as tmp:
        clips = _tar(data, Path(tmp) / "data.tar.gz", "data", gz=True)
        for model in models:  # all queued first: a server with several workers runs them side by side
            model = _model_on_server(api, model, Path(tmp))
            with open(clips, "rb") as f:
                job = api.submit("/evaluations", data={"model": model},
                                 files={"archive": ("data.tar.gz", f, "application/gzip")})
            click.echo(f"evaluation {job['id']}: {model}", err=True)
            submitted.append(job)
    results = []
    for job in submitted:
        with _progress_bar() as bar:
            job = api.follow(job["id"], bar, route="evaluations")
        if job["status"] != "succeeded":
            raise click.ClickException(f"evaluation {job['id']} of {job['model']} {job['status']}: "
                                       f"{job.get('error') or 'no reason given'}")
        results.append(job["result"])
    fields = ("wer", "rare_wer", "common_wer", "utterances", "words", "rare_words", "seconds", "audio_seconds")
    rows = [EvalResult(model=r["model"], data=str(data), **{k: r[k] for k in fields}) for r in results]
    click.echo(format_table(rows))
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
