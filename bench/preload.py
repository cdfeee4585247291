"""First-request latency with and without TARQ_PRELOAD_MODELS, on the laptop default (`tarq serve`: API and
an embedded worker, no Redis).

    python bench/preload.py                          # whisper-base, one LJSpeech clip -> bench/results/preload.md
    python bench/preload.py --model whisper-tiny.en --requests 6 --no-write

For each mode (cold: no preload; preload: TARQ_PRELOAD_MODELS=<model>) a fresh `tarq serve` starts on a
data dir of its own; the bench waits until the worker says it is ready (and, with preload, until every
pool process has preloaded the model), then sends --requests transcriptions of the same clip one after
another. On a cold server the first request a pool process takes pays the model load and the first
call's setup; the others show what a request costs once both are paid. Latencies are client-side
(request sent -> response read); each request's Server-Timing header splits them into the worker's
steps and the queue. Before the requests, the worker's main process (which polls the broker) is
watched idle for 10 s. Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import SPEECH, free_port, service_env, tarq, wait_until
from speed import RESULTS, environment, table

MODES = ("cold", "preload")


def serve(model_root: Path, model: str, work: Path, preload: bool, concurrency: int) -> tuple[subprocess.Popen, dict]:
    """A fresh `tarq serve` on its own data dir; returns it and what a client needs to reach it."""
    key = "bench-" + secrets.token_hex(8)
    port = free_port()
    env = service_env(work / "data", model_root, key, **({"TARQ_PRELOAD_MODELS": model} if preload else {}))
    with open(work / "serve.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(tarq("serve", "--port", str(port), "--concurrency", str(concurrency)), env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, {"base": f"http://127.0.0.1:{port}", "key": key, "log": work / "serve.log"}


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def idle_cpu(pid: int, seconds: float) -> float:
    """The share of one core the worker's main process (the one that polls the broker) used over `seconds`
    with nothing to do."""
    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = ticks()
    time.sleep(seconds)
    return (ticks() - before) / os.sysconf("SC_CLK_TCK") / seconds


def measure(model_root: Path, model: str, clip: Path, requests: int, preload: bool, timeout: float,
            concurrency: int = 2, idle_seconds: float = 10.0) -> dict:
    """One server: start it, wait until it is ready (and has preloaded), send `requests` transcriptions one
    after another. Each pool process of the worker keeps its own model cache, so a cold server loads the
    model once in every process that takes a request, a preloading one once in every process at start."""
    import httpx

    loads = lambda: len(re.findall(r"loading model ", text()))  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="tarq-preload-") as tmp:
        start = time.perf_counter()
        proc, at = serve(model_root, model, Path(tmp), preload, concurrency)
        text = lambda: at["log"].read_text(errors="replace")  # noqa: E731
        try:
            wait_until(lambda: httpx.get(f"{at['base']}/readyz", timeout=3).status_code == 200, timeout,
                       "the API was not ready")
            wait_until(lambda: re.search(r"celery@\S+ ready\.", text()), timeout, "the worker was not ready")
            ready = time.perf_counter() - start
            if preload:
                done = lambda: text().count(f"preloaded model {model!r}") >= concurrency  # noqa: E731
                wait_until(lambda: done() or "cannot preload" in text(), timeout, "the preload did not finish")
                if "cannot preload" in text():
                    raise RuntimeError(f"the worker could not preload {model!r}:\n{text()[-2000:]}")
            preloaded = time.perf_counter() - start
            idle = idle_cpu(int(re.search(r"worker: pid (\d+)", text()).group(1)), idle_seconds)
            at_start, latencies, texts, loaded_by, timings = loads(), [], [], [], []
            mime = mimetypes.guess_type(clip.name)[0] or "application/octet-stream"
            with httpx.Client(base_url=at["base"], headers={"Authorization": f"Bearer {at['key']}"},
                              timeout=timeout) as client:
                for _ in range(requests):
                    before, t = loads(), time.perf_counter()
                    r = client.post("/v1/audio/transcriptions", data={"model": model, "response_format": "json"},
                                    files={"file": (clip.name, clip.read_bytes(), mime)})
                    latencies.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        raise RuntimeError(f"transcription answered {r.status_code}: {r.text[:500]}")
                    texts.append(r.json()["text"])
                    dtype = r.headers.get("x-tarq-compute-dtype")
                    timings.append({k: float(ms) / 1000 for k, ms in
                                    (e.split(";dur=") for e in r.headers["server-timing"].split(", "))})
                    loaded_by.append(loads() > before)
        finally:
            stop(proc)
    return {"mode": "preload" if preload else "cold", "processes": concurrency, "ready_seconds": ready,
            "preloaded_seconds": preloaded if preload else None, "latencies": latencies, "texts": texts,
            "loads_at_start": at_start, "loaded_by_request": loaded_by, "server_timing": timings, "dtype": dtype, "idle_worker_cpu": idle}


def rows(results: list[dict]) -> list[list[str]]:
    """One row per request."""
    out = []
    for r in results:
        for i, (seconds, loaded, timing) in enumerate(zip(r["latencies"], r["loaded_by_request"], r["server_timing"])):
            first = i == 0
            out.append([r["mode"] if first else "", r["dtype"] if first else "",
                        f"{r['ready_seconds']:.1f}" if first else "",
                        f"{r['preloaded_seconds']:.1f}" if first and r["preloaded_seconds"] is not None else "",
                        str(r["loads_at_start"]) if first else "", str(i + 1), f"{seconds:.2f}",
                        "yes" if loaded else "no",
                        *(f"{timing.get(k, float('nan')):.2f}" for k in ("model", "audio", "transcribe", "queue")),
                        f"{100 * r['idle_worker_cpu']:.1f}" if first else ""])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-base", help="a model `tarq models pull` knows, or a folder")
    parser.add_argument("--clip", type=Path, default=SPEECH / "LJ001-0001.flac")
    parser.add_argument("--requests", type=int, default=4, help="transcriptions per server, one after another")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if not args.clip.is_file():
        parser.error(f"no clip at {args.clip}")
    from tarq.hub import pull

    folder = Path(args.model) if Path(args.model).is_dir() else Path(pull(args.model))
    results = []
    for mode in MODES:
        print(f"{folder.name}: {mode}", flush=True)
        results.append(measure(folder.parent, folder.name, args.clip, args.requests, mode == "preload", args.timeout))
        print(f"  latencies {[round(x, 2) for x in results[-1]['latencies']]}", flush=True)
    header = ["mode", "dtype", "ready s", "preloaded s", "loads before requests", "request", "latency s",
              "loaded the model", "model s", "audio s", "transcribe s", "queue s", "idle worker % of a core"]
    lines = [
        "# First request with and without TARQ_PRELOAD_MODELS",
        "",
        f"Command: `python bench/preload.py --model {args.model} --requests {args.requests}`",
        "",
        environment("cpu"),
        "",
        f"`tarq serve` (embedded worker, {results[0]['processes']} pool processes, each with its own model cache; "
        f"no Redis), model {folder.name}, clip {args.clip.name}; a fresh server and data dir per mode. ready s: "
        "from the start of `tarq serve` until /readyz answers and the worker says it is ready; preloaded s: "
        "until every pool process logged its preload. Requests are sent after that, one after another; "
        "latencies are client-side. loaded the model: whether a pool process loaded it during that request "
        "(a cold server loads it in each process the first time that process takes a request). model, audio, "
        "transcribe, queue: the response's Server-Timing (the worker's model cache, audio fetch and decode, "
        "transcription, and the rest of the API's wait: broker, result backend, dispatch). idle worker: the CPU "
        "the worker's main process (which polls the broker) used over 10 s before the requests.",
        "",
        *table(header, rows(results)),
        "",
    ]
    print("\n".join(lines))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "preload.md").write_text("\n".join(lines))
        (RESULTS / "preload.json").write_text(json.dumps({"model": folder.name, "clip": args.clip.name,
                                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
