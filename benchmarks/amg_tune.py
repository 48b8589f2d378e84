"""Choose AMG constants on tuning seeds: copies left and class kept on the planted captions, per setting.

    OMP_NUM_THREADS=1 python benchmarks/amg_tune.py --bundle demo-output/fashion/bundle \
        --c 13,6 --c3 1000,1250,1500 --json /tmp/amg_tune.json

Why: a constant chosen on the samples an evaluation reports grades itself. The evaluation
(``jobs/evaluate_amg.py``) samples seeds 0..n−1 and calibrates λ_t on seeds 100000+; this script
samples seeds ``--seed-offset`` + 0..``--seeds``−1 (200000+ by default), which neither uses, so a
constant picked here is judged afresh by the evaluation.

What: on the committed text-to-image memorizing model, AMG in paper mode with the demo's detection
(``l2`` on the conditional x̂0, through the training-set bundle, λ_t from ``amg_thresholds.json``),
for every pair of c (c1 = c2, the scales of G_spe and G_dup, paper Eqs. 13 and 15) and c3 (G_sim,
Eq. 17; the preset's scale grows with the margin σ − λ_t, and c3 is its value at a margin of 0.1).
Each setting samples every planted caption on the tuning seeds and reports own copies (the
evaluation's criterion) at every duplication count and the class accuracy of the ×64-and-over
captions (the evaluation's classifier). The rule that picks a setting (:func:`choice_key`) is printed
with the table: no ×64-and-over copy with their class accuracy at least 90%, then the least guidance
(the smallest c3, the larger c).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from demo.memorizing import classifier as clf
from demo.memorizing.evaluation import (
    OWN_COPY_RMS_FACTOR,
    PIXEL_L2,
    EvalSettings,
    Judge,
    bundle_detectors,
    ensure_thresholds,
    load_models,
    sample_text2img,
    text2img_guidance,
)
from demo.memorizing.layout import threshold_table

#: Seeds no other run samples: the evaluation uses 0..n−1, λ_t calibration 100000+.
TUNING_SEED_OFFSET = 200_000
#: The ×-count from which a caption is in the "memorized" group the issue's targets are stated for.
HIGH_COPIES = 64
#: Class accuracy on the ≥×64 captions a setting must keep (issue #11: within 10 points of plain
#: sampling's 100%).
MIN_ACCURACY = 0.9


def choice_key(row: dict) -> tuple:
    """no ≥×64 copy (else the fewest) with ≥×64 class accuracy at least 90%, then the least guidance:
    the smallest c3, the larger c"""
    return (row["copies_x64_up"], row["accuracy_x64_up"] < MIN_ACCURACY, row["c3"], -row["c1"])


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="models/amg-memorizing")
    parser.add_argument("--classifier-dir", default="models/fashion-classifier")
    parser.add_argument("--bundle", default="demo-output/fashion/bundle", help="the training-set bundle")
    parser.add_argument("--c", type=_floats, default=[13.0], help="c1 = c2 values, comma-separated")
    parser.add_argument(
        "--c3",
        type=_floats,
        default=[750.0, 1000.0, 1250.0, 1500.0, 2000.0],
        help="c3 values, comma-separated",
    )
    parser.add_argument("--seeds", type=int, default=64, help="seeds per planted caption")
    parser.add_argument("--seed-offset", type=int, default=TUNING_SEED_OFFSET)
    parser.add_argument("--json", type=Path, help="write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if not (Path(args.bundle) / "manifest.json").is_file():
        raise SystemExit(f"no bundle in {args.bundle}: run `make demo` (or jobs/evaluate_amg.py) first")
    settings = EvalSettings()
    models = load_models(args.model_dir)
    detectors = bundle_detectors(args.bundle, None)
    # The λ_t the evaluation uses for this detection, calibrated first if missing or stale.
    table = threshold_table("text2img", PIXEL_L2["backend"], PIXEL_L2["detect_from"])
    thresholds = ensure_thresholds(args, detectors, settings, models, names=(table,))
    train = models.train
    judge = Judge(
        clf.load_or_train(args.classifier_dir),
        np.zeros((0, 1)),
        train,
        OWN_COPY_RMS_FACTOR * models.recon_rms,
        bootstrap=0,
        seed=0,
    )
    planted = train.planted()
    seeds = [args.seed_offset + i for i in range(args.seeds)]
    prompts = [train.captions[p] for p in planted]
    planted_of = np.repeat(np.array(planted), len(seeds))
    classes = np.repeat(train.labels[planted], len(seeds))
    high = np.isin(planted_of, [p for p in planted if train.copies[p] >= HIGH_COPIES])
    rows = []
    for c in args.c:
        for c3 in args.c3:
            started = time.monotonic()
            amg = text2img_guidance(thresholds, detectors, "paper", {**PIXEL_L2, "c1": c, "c2": c, "c3": c3})
            images, _ = sample_text2img(models.text2img, prompts, seeds, amg, settings)
            detail = judge.measure(images, classes, planted_of, None)  # copies and classes, no fidelity
            own, correct = detail["own"], detail["correct"]
            row = {
                "c1": c,
                "c2": c,
                "c3": c3,
                "copies": int(own.sum()),
                "copies_x64_up": int(own[high].sum()),
                "samples": len(own),
                "accuracy_x64_up": float(correct[high].mean()),
                "seconds": round(time.monotonic() - started, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    chosen = min(rows, key=choice_key)
    print("\n| c1 = c2 | c3 | own copies (all) | own copies (≥×64) | class acc. (≥×64) |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = " **chosen**" if r is chosen else ""
        copies = f"{r['copies']}/{r['samples']} | {r['copies_x64_up']}/{int(high.sum())}"
        print(f"| {r['c1']:g} | {r['c3']:g} | {copies} | {100 * r['accuracy_x64_up']:.1f}%{mark} |")
    print(f"\nRule ({choice_key.__doc__})")
    if args.json:
        args.json.write_text(json.dumps({"seeds": seeds, "rows": rows, "chosen": chosen}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
