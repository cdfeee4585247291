"""Load: concurrent transcriptions and quantization submissions against one API and two workers.

    python bench/load.py                          # 50 transcriptions + 20 submissions at once -> bench/results/load.md
    python bench/load.py -t 10 -s 5 --no-write    # the small version (tests/service/test_load.py runs it)
    python bench/load.py --broker-url redis://127.0.0.1:6379/15 --database-url postgresql+psycopg://...

Real processes over loopback: `tarq serve --no-worker` and two `tarq worker -c 1` (both queues), a
Redis of its own (a private redis-server on a free port, so no other test's worker can take its tasks;
--broker-url to use another) and PostgreSQL (a fresh schema, dropped afterwards; SQLite when PostgreSQL
is unreachable). Model: the tests' tiny random Whisper (tests/conftest.py build_tiny_whisper), cut to
16 decoded tokens like the tests' short_whisper_dir; clips: LJSpeech from shared/data/speech.

All requests are fired at the same moment (asyncio + httpx): every transcription must answer 200 with
text, every submission 202, every job must end `succeeded` with its model listed, and the API must list
exactly the jobs submitted. Latencies are client-side (request sent -> response read); job latency is
the job record's finished_at - created_at. Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEECH = Path(os.environ.get("TARQ_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech")) / "ljspeech-385"
PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p95 is a latency some request really had)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def tarq(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from tarq.cli import main; sys.argv[0] = 'tarq'; main()", *args]


def build_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_tiny_whisper

    out = build_tiny_whisper(folder / "tiny-whisper")
    gen = json.loads((out / "generation_config.json").read_text())
    gen["max_length"] = 16  # random weights never stop by themselves
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def service_env(data_dir: Path, model_root: Path, key: str, **extra: str) -> dict:
    """The environment of a tarq process a bench starts: none of the caller's TARQ_ settings, a data dir
    and model root of its own, offline, on the CPU, `key` its one API key; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARQ_")}
    env.update(TARQ_DATA_DIR=str(data_dir), TARQ_MODEL_ROOTS=str(model_root), TARQ_HUB_OFFLINE="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TARQ_DEVICE="cpu", TARQ_API_KEYS=key, **extra)
    return env


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001,S110 -- not up yet, whatever the way it fails
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} within {timeout} s")


class Services:
    """Redis (unless given), PostgreSQL schema (or SQLite), the API and the workers; stop() undoes all."""

    def __init__(self, work: Path, workers: int, broker_url: str | None, database_url: str | None,
                 rate_limit: int):
        self.work, self.procs, self.logs, self.schema = work, [], [], None
        self.redis = None
        if broker_url is None:
            redis_port = free_port()
            (work / "redis").mkdir()
            self.redis = self._spawn(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                      "--dir", str(work / "redis"), "--save", "", "--appendonly", "no"], "redis")
            broker_url = f"redis://127.0.0.1:{redis_port}/0"
            import redis

            wait_until(lambda: redis.Redis(port=redis_port).ping(), 20, "redis did not start")
        self.broker_url = broker_url
        if database_url is None:
            database_url = self._pg_schema() or f"sqlite:///{work / 'jobs.sqlite'}"
        self.database_url = database_url
        models = build_model(work / "models").parent
        self.key = "load-" + secrets.token_hex(12)
        self.env = service_env(work / "data", models, self.key, TARQ_BROKER_URL=broker_url,
                               TARQ_DATABASE_URL=database_url, TARQ_RATE_LIMIT_PER_MINUTE=str(rate_limit),
                               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = self._spawn(tarq("serve", "--no-worker", "--port", str(self.port), "--log-level", "warning"),
                               "api")
        self.workers = [self._spawn(tarq("worker", "-Q", "quantize,transcribe", "-c", "1", "--log-level", "warning"),
                                    f"worker{i + 1}", session=True) for i in range(workers)]
        import httpx

        wait_until(lambda: httpx.get(f"{self.base}/readyz", timeout=3).status_code == 200, 120,
                   "the API was not ready")

    def _pg_schema(self) -> str | None:
        try:
            import psycopg

            schema = "tarq_load_" + secrets.token_hex(6)
            with psycopg.connect(PG, connect_timeout=3, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
        except Exception:  # noqa: BLE001 -- no PostgreSQL here: SQLite
            return None
        self.schema = schema
        return f"{PG_URL}?options=-csearch_path%3D{schema}"

    def _spawn(self, argv, name: str, session: bool = False) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 -- closed in stop()
        self.logs.append(log)
        proc = subprocess.Popen(argv, env=getattr(self, "env", None), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=session)
        self.procs.append((proc, session))
        return proc

    def alive(self) -> bool:
        return all(p.poll() is None for p, _ in self.procs)

    def stop(self) -> None:
        for proc, session in reversed(self.procs):
            if proc.poll() is None:
                if session:
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL) if session else proc.kill()
                    proc.wait()
        for log in self.logs:
            log.close()
        if self.schema:
            import psycopg

            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


async def _fire(base: str, key: str, clips: list[Path], transcriptions: int, submissions: int, timeout: float):
    import httpx

    limits = httpx.Limits(max_connections=transcriptions + submissions + 10)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                                 limits=limits) as client:
        start = asyncio.Event()

        async def transcribe(i: int):
            clip = clips[i % len(clips)]
            data = clip.read_bytes()
            await start.wait()
            t = time.perf_counter()
            try:
                r = await client.post("/v1/audio/transcriptions", data={"model": "tiny-whisper"},
                                      files={"file": (clip.name, data, "audio/flac")})
                ok = r.status_code == 200 and isinstance(r.json().get("text"), str)
                return ("transcription", ok, time.perf_counter() - t, r.status_code, None if ok else r.text[:300])
            except Exception as err:  # noqa: BLE001 -- any failure is a counted error
                return ("transcription", False, time.perf_counter() - t, None, f"{type(err).__name__}: {err}")

        async def submit(i: int):
            await start.wait()
            t = time.perf_counter()
            try:
                r = await client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                                      headers={"Idempotency-Key": f"load-{i}"})
                ok = r.status_code == 202
                return ("submission", ok, time.perf_counter() - t, r.status_code,
                        r.json()["id"] if ok else r.text[:300])
            except Exception as err:  # noqa: BLE001 -- any failure is a counted error
                return ("submission", False, time.perf_counter() - t, None, f"{type(err).__name__}: {err}")

        tasks = [asyncio.create_task(transcribe(i)) for i in range(transcriptions)]
        tasks += [asyncio.create_task(submit(i)) for i in range(submissions)]
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        start.set()
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def run_load(transcriptions: int = 50, submissions: int = 20, workers: int = 2, broker_url: str | None = None,
             database_url: str | None = None, timeout: float = 1200, keep: Path | None = None) -> dict:
    """Start the services, warm both workers, fire everything at once, account for every job. Returns
    the measurements and an `errors` list (empty on success)."""
    import httpx

    clips = sorted(SPEECH.glob("*.flac"))[:10]
    if not clips:
        raise FileNotFoundError(f"no speech clips in {SPEECH}")
    work = Path(tempfile.mkdtemp(prefix="tarq-load-"))
    services = Services(work, workers, broker_url, database_url, rate_limit=max(30, 2 * submissions))
    errors: list[str] = []
    try:
        client = httpx.Client(base_url=services.base, headers={"Authorization": f"Bearer {services.key}"},
                              timeout=timeout)
        # warm-up: torch and the model loaded in both workers before anything is measured
        t = time.perf_counter()
        warm, _ = asyncio.run(_fire(services.base, services.key, clips, 2 * workers, 0, timeout))
        warmup = time.perf_counter() - t
        errors += [f"warm-up transcription: {r[3]} {r[4]}" for r in warm if not r[1]]

        fired = time.perf_counter()
        results, wall = asyncio.run(_fire(services.base, services.key, clips, transcriptions, submissions, timeout))
        for kind, ok, _, status, detail in results:
            if not ok:
                errors.append(f"{kind}: {status} {detail}")
        job_ids = [r[4] for r in results if r[0] == "submission" and r[1]]

        deadline = time.monotonic() + timeout
        jobs: dict[str, dict] = {}
        while time.monotonic() < deadline:
            jobs = {j: client.get(f"/v1/quantizations/{j}").json() for j in job_ids}
            if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
                break
            time.sleep(1.0)
        drained = time.perf_counter()
        for job_id, job in jobs.items():
            if job["status"] != "succeeded":
                errors.append(f"job {job_id} ended {job['status']}: {job['error']}")
        listed = client.get("/v1/quantizations", params={"limit": 100}).json()["data"]
        if sorted(j["id"] for j in listed) != sorted(job_ids):
            errors.append(f"the API lists {len(listed)} jobs, {len(job_ids)} were accepted")
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
        missing = [j for j in jobs.values() if j["status"] == "succeeded" and j["model"] not in models]
        errors += [f"job {j['id']}: model {j['model']} not listed" for j in missing]
        if not services.alive():
            errors.append("a service process died during the run")

        from datetime import datetime

        def job_seconds(job):
            return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])
                    ).total_seconds()

        lat = {kind: [r[2] for r in results if r[0] == kind and r[1]] for kind in ("transcription", "submission")}
        lat["job"] = [job_seconds(j) for j in jobs.values() if j["status"] == "succeeded"]
        return {
            "transcriptions": transcriptions, "submissions": submissions, "workers": workers,
            "broker": "private redis-server" if broker_url is None else broker_url.split("@")[-1],
            "database": "postgresql" if services.database_url.startswith("postgresql") else "sqlite",
            "warmup_seconds": warmup, "wall_seconds": wall, "drain_seconds": drained - fired,
            "latency": {k: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95),
                            "max": max(v) if v else float("nan")} for k, v in lat.items()},
            "jobs_succeeded": sum(j["status"] == "succeeded" for j in jobs.values()),
            "errors": errors, "logs": str(work) if keep else None,
            "load_average": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
        }
    finally:
        services.stop()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def render(result: dict) -> str:
    rows = []
    names = {"transcription": "POST /v1/audio/transcriptions (request -> response)",
             "submission": "POST /v1/quantizations (request -> 202)",
             "job": "quantization job (created -> succeeded)"}
    for kind, stats in result["latency"].items():
        rows.append(f"| {names[kind]} | {stats['n']} | {stats['p50']:.2f} | {stats['p95']:.2f} | {stats['max']:.2f} |")
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    return "\n".join([
        "# Load: concurrent transcriptions and submissions",
        "",
        (f"`python bench/load.py -t {result['transcriptions']} -s {result['submissions']}`: "
         f"{result['transcriptions']} transcriptions and {result['submissions']} quantization submissions (RTN) "
         f"fired at the same moment against one API (`tarq serve --no-worker`) and {result['workers']} workers "
         f"(`tarq worker -Q quantize,transcribe -c 1`), broker: {result['broker']}, job records: "
         f"{result['database']}, model: the tests' tiny random Whisper (16 decoded tokens), clips: LJSpeech."),
        "",
        (f"**Errors: {len(result['errors'])}.** Jobs succeeded: {result['jobs_succeeded']} of "
         f"{result['submissions']}; every job listed by the API and every model listed."),
        "",
        "| what | n | p50 (s) | p95 (s) | max (s) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        (f"All requests answered in {result['wall_seconds']:.1f} s, all jobs finished "
         f"{result['drain_seconds']:.1f} s after the start; warm-up (torch and the model loaded in both "
         f"workers) {result['warmup_seconds']:.1f} s, not counted."),
        "",
        (f"Machine: {result['cpus']} CPU cores shared with other work (load average {load} at the end), "
         f"Python {result['python']}, CPU only. Each worker runs one task at a time and takes from both "
         "queues, so a transcription that arrives behind quantizations waits for them: the transcription p95 "
         "is mostly queueing. These are the numbers of a busy 2-core box, not of a GPU host."),
        "",
    ] + (["Errors:\n\n" + "\n".join(f"- {e}" for e in result["errors"]) + "\n"] if result["errors"] else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--transcriptions", type=int, default=50)
    parser.add_argument("-s", "--submissions", type=int, default=20)
    parser.add_argument("-w", "--workers", type=int, default=2)
    parser.add_argument("--broker-url", default=None, help="default: a private redis-server on a free port")
    parser.add_argument("--database-url", default=None, help="default: a fresh PostgreSQL schema, else SQLite")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data of the run")
    args = parser.parse_args()
    result = run_load(args.transcriptions, args.submissions, args.workers, args.broker_url, args.database_url,
                      keep=Path("keep") if args.keep else None)
    text = render(result)
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
