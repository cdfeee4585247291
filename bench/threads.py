"""CPU threads per worker process: what happens when several processes each take every core.

    python bench/threads.py                      # 2 concurrent GPTQ runs, whisper-tiny.en, 16 clips
    python bench/threads.py --procs 2 --threads 2,1 --method tarq --calib-n 32

torch sizes its thread pool to the machine's cores in every process. A Celery worker with -c 2 has two
pool processes; when both run a job, twice as many threads as cores spin at every parallel region, and
small ops (GPTQ's column sweep) wait on threads that are not scheduled. Runs `--procs` identical
quantizations at once with each thread count (OMP_NUM_THREADS, which torch reads at start), after one
run alone with each, and reports each process's wall time and stages. Writes bench/results/threads.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from speed import JOB_MARK, RESULTS, SPEECH, environment, table


def launch(threads: int, spec: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "speed.py"), "--job", json.dumps(spec)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(p: subprocess.Popen) -> dict:
    out, err = p.communicate()
    for line in reversed(out.splitlines()):
        if line.startswith(JOB_MARK):
            return json.loads(line[len(JOB_MARK):])
    return {"error": (err.strip().splitlines() or ["no output"])[-1]}


def run(procs: int, threads: int, spec: dict, work: Path) -> dict:
    t = time.perf_counter()
    ps = [launch(threads, {**spec, "out_dir": str(work / f"p{procs}-t{threads}-{i}")}) for i in range(procs)]
    rows = [collect(p) for p in ps]
    return {"procs": procs, "threads": threads, "wall_s": time.perf_counter() - t, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--calib", type=Path, default=SPEECH / "ljspeech-385")
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", default=None, help="comma list (default: all cores, then cores / procs)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "threads.md")
    args = ap.parse_args()

    from tarq.hub import pull

    cores = len(os.sched_getaffinity(0))
    counts = [int(t) for t in args.threads.split(",")] if args.threads else \
        sorted({cores, max(1, cores // args.procs)}, reverse=True)
    spec = {"kind": "quantize", "model": str(pull(args.model)), "method": args.method, "calib": str(args.calib),
            "calib_n": args.calib_n}
    results = [run(n, t, spec, args.work) for n in (1, args.procs) for t in counts]

    stage = lambda r, k: f"{r['stages'].get(k, float('nan')):.1f}" if "stages" in r else "-"
    rows = []
    for res in results:
        for i, r in enumerate(res["runs"]):
            rows.append([f"{res['procs']} x {res['threads']} threads", str(i + 1),
                         f"{r['seconds']:.1f}" if "seconds" in r else "failed: " + r.get("error", "?"),
                         stage(r, "forward"), stage(r, "statistics"), stage(r, "solve"), f"{res['wall_s']:.1f}"])
    lines = ["# Threads per process", "",
             f"Command: `python bench/threads.py {' '.join(sys.argv[1:])}`", "",
             f"Run: {environment('cpu')}; {cores} cores available.", "",
             (f"Each process: `{args.method}` on {Path(args.model).name}, {args.calib_n} clips (bench/speed.py's "
              "quantize job), alone and then `--procs` at once (processes of one row group start together)."), ""]
    lines += table(["processes x threads each", "process", "wall s", "forward s", "statistics s", "solve s",
                    "all done s"], rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
