"""bench/seeds.py's report: TARQ - GPTQ per seed is paired on the same utterances and summarised over seeds.
Hypotheses are built from the real transcripts (no model runs): GPTQ's are the references, TARQ's drop
every word of some utterances, so the expected differences are known."""
import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seeds(speech_dir):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "bench" / "seeds.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return mod


def row(variant: str, hyps: dict[str, dict[str, str]], quality) -> dict:
    from tarq.metrics import score

    evals = {}
    for data, h in hyps.items():
        refs = quality.references(data)
        s = score([refs[n] for n in h], list(h.values()))
        evals[data] = {"wer": s.wer, "rare_wer": s.rare_wer, "hypotheses": h}
    return {"model": "m", "variant": variant, "eval": evals}


def test_report_pairs_tarq_with_gptq_per_seed(seeds, tmp_path):
    import quality  # loaded by the fixture's import of bench/seeds.py

    refs = {d: quality.references(d) for d in seeds.SETS}
    rows = {}
    for seed, dropped in ((0, 0), (1, 5)):
        good = {d: dict(list(r.items())[:20]) for d, r in refs.items()}
        # TARQ misses every word of the first `dropped` utterances on each set, and nothing else
        bad = {d: {n: ("" if i < dropped else t) for i, (n, t) in enumerate(h.items())} for d, h in good.items()}
        rows[("m", seed, "fp")] = row("fp", good, quality)
        rows[("m", seed, "gptq")] = row("gptq", good, quality)
        rows[("m", seed, "tarq")] = row("tarq", bad, quality)
    args = Namespace(calib_n=128, out=tmp_path / "seeds.md", order="block", tarq_variant="tarq-text-lambda")
    seeds.write_report(rows, args)
    assert args.out.read_text().startswith("# TARQ vs GPTQ across calibration draws (TARQ column: `tarq-text-lambda`)")
    args = Namespace(calib_n=128, out=tmp_path / "seeds.md", order="layer", tarq_variant=None)
    seeds.write_report(rows, args)
    text = args.out.read_text()
    assert text.startswith("# TARQ vs GPTQ across calibration draws, both in layer order (`--sequential layer`)\n")
    assert seeds.variants("layer") == {"fp": "fp", "gptq": "gptq-layer", "tarq": "tarq-layer"}
    assert seeds.variants("block") == {"fp": "fp", "gptq": "gptq", "tarq": "tarq"}
    lines = [ln for ln in text.splitlines() if ln.startswith("| m |")]
    assert len(lines) == 2
    assert lines[0].endswith("| +0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] |")  # seed 0: identical texts
    # seed 1: a positive difference on both sets, the size of the rare words lost
    for s in seeds.SETS:
        good = dict(list(refs[s].items())[:20])
        lost = row("x", {s: {n: ("" if i < 5 else t) for i, (n, t) in enumerate(good.items())}}, quality)
        expected = lost["eval"][s]["rare_wer"]
        assert expected > 0
        assert f"m {s}: +0.00, +{expected:.2f} (mean +{expected / 2:.2f})" in text
