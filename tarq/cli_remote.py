"""`tarq remote`: quantize on a tarq server from a laptop, in one command.

A local model folder is uploaded first (POST /v1/models); calibration clips go as one tar.gz; the job's
progress events drive a progress bar; the quantized folder is downloaded into --out. Only the HTTP API
is used (httpx), so the server can be anywhere a GPU is.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import click

CONNECT_TIMEOUT_S = 10.0


class Remote:
    """The server's HTTP API; any refusal becomes one ClickException line with the server's message."""

    def __init__(self, server: str, key: str):
        import httpx

        self.httpx = httpx
        self.client = httpx.Client(base_url=server.rstrip("/") + "/v1", headers={"Authorization": f"Bearer {key}"},
                                   timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S))

    def call(self, method: str, path: str, **kw) -> dict:
        try:
            response = self.client.request(method, path, **kw)
        except self.httpx.HTTPError as err:
            raise click.ClickException(f"cannot reach {self.client.base_url}: {err}") from None
        self.check(response)
        return response.json()

    def check(self, response) -> None:
        if response.status_code < 400:
            return
        response.read()  # a streamed answer has not read its body yet
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        raise click.ClickException(f"server said {response.status_code}: {message}")

    def follow(self, job_id: str, bar) -> dict:
        """Read the job's server-sent events until its end; returns the final job."""
        try:
            with self.client.stream("GET", f"/quantizations/{job_id}/events") as response:
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
@click.option("--out", type=click.Path(path_type=Path), help="Download the quantized folder here.")
def quantize_remote(model, server, key, calib, method, num_samples, out):
    """Quantize MODEL on the server and print the new model's id. MODEL is a local Whisper folder (uploaded
    first), a model id of the server, a folder under its TARQ_MODEL_ROOTS, or a Hub id."""
    from tqdm import tqdm

    if out is not None and out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty")
    api = Remote(server, key)
    with tempfile.TemporaryDirectory(prefix="tarq-remote-") as tmp:
        if Path(model).is_dir():
            folder = Path(model)
            with open(_tar(folder, Path(tmp) / "model.tar", folder.name, gz=False), "rb") as f:
                model = api.call("POST", "/models", data={"name": folder.name},
                                 files={"archive": ("model.tar", f, "application/x-tar")})["id"]
            click.echo(f"uploaded {folder} as {model}", err=True)
        form = {"model": model, "method": method}
        if num_samples is not None:
            form["num_samples"] = str(num_samples)
        if calib is not None:
            with open(_tar(calib, Path(tmp) / "calib.tar.gz", "calib", gz=True), "rb") as f:
                job = api.call("POST", "/quantizations", data=form,
                               files={"archive": ("calib.tar.gz", f, "application/gzip")})
        else:
            job = api.call("POST", "/quantizations", data=form)
    click.echo(f"job {job['id']}", err=True)
    with tqdm(total=100, unit="%", bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}") as bar:
        job = api.follow(job["id"], bar)
    if job["status"] != "succeeded":
        raise click.ClickException(f"job {job['id']} {job['status']}: {job.get('error') or 'no reason given'}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        api.download(job["model"], out)
        click.echo(f"downloaded to {out}", err=True)
    click.echo(job["model"])
