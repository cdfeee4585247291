"""One encoder layer at several batch sizes: the cost per clip and where it goes.

Why it exists: on CPU with glibc, tensors above the 32 MiB mmap threshold are fresh mmaps that the
kernel zero-fills page by page on every call, so elementwise ops on whisper's fc1 activations get much
slower once a batch's activation crosses that size. tarq.models.whisper.encoder_batch_size picks the
largest batch under the threshold; this shows, on the host at hand, whether that choice pays.

    python bench/encoder_batch.py --model whisper-base --batches 1,2,4,8
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="whisper-base", help="Hub id / local name (tarq models pull) or folder")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--clips", type=int, default=8, help="clips per measurement (a multiple of every batch)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer", type=int, default=1)
    args = ap.parse_args()

    from torch.profiler import profile

    from tarq.hub import pull
    from tarq.models.whisper import encoder_batch_size, widest_encoder_activation
    from tarq.transcribe import load

    source = args.model if Path(args.model).is_dir() else pull(args.model)
    model, _ = load(source)
    cfg = model.config
    layer = model.model.encoder.layers[args.layer]
    chosen = encoder_batch_size(cfg, args.clips, torch.device("cpu"), 4)
    x = torch.randn(args.clips, cfg.max_source_positions, cfg.d_model)
    print(f"{Path(str(source)).name}, encoder layer {args.layer}, {args.clips} clips; "
          f"encoder_batch_size picks {chosen}; torch threads {torch.get_num_threads()}")
    print("| batch | fc1 output MiB per call | ms per clip (best of reps) | gelu + copies, share of profiled time |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for bs in (int(b) for b in args.batches.split(",")):
            chunks = x.split(bs)

            def run(chunks=chunks):
                for c in chunks:
                    layer(c, attention_mask=None)

            run()  # warm-up: the allocator's thresholds settle
            best = float("inf")
            for _ in range(args.reps):
                t = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t)
            with profile() as prof:
                run()
            ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
            total = sum(ops.values())
            elementwise = ops.get("aten::gelu", 0) + ops.get("aten::copy_", 0)
            mib = bs * widest_encoder_activation(cfg, 4) / 2**20
            print(f"| {bs} | {mib:.0f} | {1000 * best / args.clips:.1f} | {elementwise / max(total, 1):.0%} |")


if __name__ == "__main__":
    main()
