#!/usr/bin/env bash
# GPU check for a lent H100/H200: the GPU tests, then the GPU benchmarks, one short table, < 8 minutes.
#
# That machine has no internet; torch, transformers, torchaudio, pytest, psutil are installed there.
# What tarq needs beyond them travels as wheels in .whl/ (git-ignored). Fetch them here, once, from the
# repository root (pins as in pyproject.toml; transformers/tokenizers too, so the GPU runs the versions
# the tests were written against rather than the image's):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     compressed-tensors==0.20.0 loguru==0.7.3 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0 transformers==5.24.0 tokenizers==0.23.3 \
#     regex==2026.11.19 greenlet==3.5.6
#   # only for the real-model step below (audio decoding): add  av==18.1.0
#
# Real small models (optional): copy a model folder to .gpu/models/<name>/ and a few clips to .gpu/speech/
# (both git-ignored via .git/info/exclude or .gitignore) and carry ".gpu". Mind the 64 MiB carry limit:
# whisper-tiny.en alone is 148 MB in fp32, so today this step normally finds nothing and says so.
#
# Run it with the device tool: carry [".whl"] (and ".gpu"), timeout_s 540, command `bash bench/gpu_check.sh`.
# It installs the wheels itself (the device README's line:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   && export PYTHONPATH=/tmp/site). Results: $OUT/gpu_check.md, $OUT/gpu_check.json and $OUT/gpu_check.log
# (bench/results/gpu/ when $OUT is unset); the last lines printed are the summary table.
#
# Before spending device time, check the script here: `GPU_CHECK_DRY=1 OUT=/tmp/dry bash bench/gpu_check.sh`
# runs every step on the CPU with small shapes (tests/test_gpu_check.py does, marked slow).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUDGET=${GPU_CHECK_BUDGET_S:-460}  # whole script, seconds; each step gets what its own cap and this leave
OUTDIR=${OUT:-$ROOT/bench/results/gpu}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

# GPU_CHECK_DRY=1: the same steps on this machine's CPU with a small random shape and 4 clips (compiled
# decoding skipped), to check the script itself before device time is spent on it: no number it prints
# is a GPU number.
if [[ ${GPU_CHECK_DRY:-0} == 1 ]]; then
  DEV=cpu CLIPS=4 TOKENS=8
  SHAPE=(--large-shape '{"d_model": 128, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "encoder_ffn_dim": 512, "decoder_ffn_dim": 512, "vocab_size": 51866,
    "num_mel_bins": 128, "max_source_positions": 1500, "max_target_positions": 448}')
else
  DEV=cuda CLIPS=128 TOKENS=48 SHAPE=()
fi

say() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }
# step NAME CAP_S CMD...: run CMD under `timeout` (its cap, or the time left if less), log it, note its status
STATUS=()
step() {
  local name=$1 cap=$2
  shift 2
  local t
  t=$(left)
  ((t < cap)) && cap=$t
  if ((cap < 15)); then
    say "$name: skipped (time budget spent)"
    STATUS+=("$name|skipped: no time left|0")
    return 0
  fi
  say "$name: start (cap ${cap}s)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local what="ok"
  ((rc == 124 || rc == 137)) && what="TIMED OUT after ${cap}s"
  ((rc != 0 && rc != 124 && rc != 137)) && what="failed (exit $rc)"
  say "$name: $what in $((SECONDS - t0))s"
  STATUS+=("$name|$what|$((SECONDS - t0))")
}

if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG" || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
else
  say "no .whl/ carried: using the image's packages only (compressed-tensors is then missing)"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

step env 60 python3 - <<'EOF'
import importlib, os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count)
for m in ("transformers", "tokenizers", "compressed_tensors", "pydantic", "av", "wordfreq"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__)
assert torch.cuda.is_available() or os.environ.get("GPU_CHECK_DRY") == "1", "no CUDA device"
EOF

# The GPU tests: only files that hold a gpu mark (others may import packages that did not travel).
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
if ((${#GPU_TESTS[@]})); then
  step "pytest -m gpu" 120 python3 -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
else
  say "no test file carries a gpu mark"
fi

# whisper-large-v3 shapes, random weights, RTN int4: eager fp16 vs int4 at batch 1 and 8.
step "large-v3 eager" 170 python3 bench/speed.py --device "$DEV" --parts large --large-variants eager \
  --batch-sizes 1,8 --tokens "$TOKENS" "${SHAPE[@]}" --job-timeout 160 --out "$WORK/large-eager.md"

# TARQ on whisper-large-v3 shapes with 128 random clips: the driver's wall time against the 3-minute target.
# In this process (--no-isolate), so that a run stopped by its cap still leaves one log line per block.
step "large-v3 TARQ quantize" 200 python3 bench/speed.py --device "$DEV" --parts large-quantize --methods tarq \
  --calib-n "$CLIPS" --tokens "$TOKENS" "${SHAPE[@]}" --no-isolate --out "$WORK/large-quantize-tarq.md"

# The same with a static KV cache + torch.compile (CUDA graphs): batch 1, where eager is launch-bound.
# fp16 and int4 compile in separate processes, each within --job-timeout.
if [[ $DEV == cuda ]]; then
  step "large-v3 compiled" 225 python3 bench/speed.py --device cuda --parts large --large-variants compiled \
    --batch-sizes 1 --tokens "$TOKENS" --job-timeout 105 --out "$WORK/large-compiled.md"
else
  STATUS+=("large-v3 compiled|skipped: dry run|0")
fi

# GPTQ on the same shapes and clips: TARQ's ratio to it (target <= 1.3x).
step "large-v3 GPTQ quantize" 150 python3 bench/speed.py --device "$DEV" --parts large-quantize --methods gptq \
  --calib-n "$CLIPS" --tokens "$TOKENS" "${SHAPE[@]}" --no-isolate --out "$WORK/large-quantize-gptq.md"

# GPTQ solver: textbook loop vs tarq.gptq on tiny and large-v3 shapes, and one large-v3 pass estimated.
step "solver ($DEV)" 90 python3 bench/speed.py --solver-only --device "$DEV" --job-timeout 80 --out "$WORK/solver.md"

# Real small models, only when a model folder travelled (and PyPI's av for decoding the clips).
MODELS=$(ls -d .gpu/models/*/ 2>/dev/null | sed 's:/$::' | paste -sd, -)
if [[ -n $MODELS ]] && compgen -G ".gpu/speech/*" >/dev/null && python3 -c "import av" 2>/dev/null; then
  step "real models" 150 python3 bench/speed.py --device "$DEV" --parts transcribe --models "$MODELS" \
    --audio .gpu/speech --clips 8 --batch-sizes 1,8 --job-timeout 140 --out "$WORK/real.md"
else
  say "real models: skipped (need .gpu/models/<name>/, clips in .gpu/speech/ and av)"
  STATUS+=("real models|skipped: nothing carried|0")
fi

# One report, one JSON, one table.
cat "$WORK"/*.md >"$OUTDIR/gpu_check.md" 2>/dev/null
STATUS_LINES=$(printf '%s\n' "${STATUS[@]}")
STATUS_LINES=$STATUS_LINES python3 - "$WORK" "$OUTDIR" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
from pathlib import Path

work, outdir = Path(sys.argv[1]), Path(sys.argv[2])
res = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
res["steps"] = [dict(zip(("step", "status", "seconds"), ln.split("|"))) for ln in os.environ["STATUS_LINES"].splitlines() if ln]
(outdir / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))

rows = [(s["step"], s["status"], s["seconds"] + " s") for s in res["steps"]]
solver = res.get("solver", {}).get("solver", {})
if "error" in solver:
    rows.append((f"GPTQ solver ({solver.get('device', '?')})", "failed", solver["error"][:60]))
if "large_pass_tarq_s" in solver:
    rows.append(("GPTQ pass, all large-v3 layers", f"textbook {solver['large_pass_textbook_s']:.1f} s",
                 f"tarq.gptq {solver['large_pass_tarq_s']:.1f} s"))
for key in ("large-eager", "large-compiled"):
    for r in res.get(key, {}).get("large", []):
        if "error" in r:
            rows.append((f"large-v3 {key.split('-')[1]}", "failed", r["error"][:60]))
            continue
        models = r["models"]
        for bs in models.get("fp", {}).get("runs", {}):
            fp = models["fp"]["runs"][bs]["ms_per_token"]
            q = models.get("int4", {}).get("runs", {}).get(bs, {}).get("ms_per_token")
            speed = f"{fp / q:.2f}x" if q else "int4 failed"
            rows.append((f"large-v3 {r['variant']} b{bs} ms/token", f"{r.get('dtype', 'fp16')} {fp:.2f} / int4 {q or float('nan'):.2f}",
                         f"int4 speed-up {speed}"))
        for name, m in models.items():
            if "error" in m:
                rows.append((f"large-v3 {r['variant']} {name}", "failed", m["error"][:60]))
quant = {r.get("method"): r for key in ("large-quantize-tarq", "large-quantize-gptq")
         for r in res.get(key, {}).get("large_quantize", [])}
for method, r in quant.items():
    if "error" in r:
        rows.append((f"large-v3 {method} quantize", "failed", r["error"][:60]))
        continue
    st = r["stages"]
    vs = (f"{r['seconds'] / quant['gptq']['seconds']:.2f}x GPTQ" if method == "tarq" and "seconds" in quant.get("gptq", {})
          else "")
    target = " (target 180 s)" if method == "tarq" else ""
    rows.append((f"large-v3 {method} quantize, {r['clips']} clips", f"{r['seconds']:.0f} s{target} {vs}".strip(),
                 f"fwd {st.get('forward', 0):.0f} / stats {st.get('statistics', 0):.0f} / solve {st.get('solve', 0):.0f} s, "
                 f"peak {r['peak_cuda_mb'] or 0:.0f} MiB"))
for r in res.get("real", {}).get("transcribe", []):
    if "error" not in r:
        for bs, run in r["runs"].items():
            rows.append((f"{r.get('base_model', r['model'])} {r['variant']} b{bs}", f"RTF {run['rtf']:.4f}",
                         f"peak CUDA {run['peak_cuda_mb'] or 0:.0f} MiB"))
w = [max(len(str(x[i])) for x in rows) for i in range(3)] if rows else [0, 0, 0]
print("\n" + "\n".join(" | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows))
print("\n(large-v3 rows use RANDOM weights and calibration data: speed only.)")
EOF
say "done in ${SECONDS}s; report $OUTDIR/gpu_check.md"
rm -rf "$WORK"
