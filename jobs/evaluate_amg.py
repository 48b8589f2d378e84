"""Evaluate Anti-Memorization Guidance on the memorizing demo models (the paper's Tables 1, 2 and 4).

    python jobs/evaluate_amg.py --out demo-output/amg_eval

Samples the text-to-image model on its duplicated (and some non-duplicated) training captions with
plain sampling, AMG 'paper', AMG 'reference' and each term ablated, and the unconditional model
with and without AMG; measures copying (nL2 < 1.4 and copy descriptor > 0.5 against the training
set), a fidelity proxy (KID on random conv features) and a text-alignment proxy (the model's own
diffusion classifier). Writes OUT/summary.json ({"off": {...}, "on": {...}, "modes": {...}}),
OUT/table.md and sample grids. Trains the models first if --model-dir holds none.
"""

from _bootstrap import run_job

from demo.memorizing.evaluation import run_amg_evaluation
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="amg", extra=()), argv).amg
    with output_lock(cfg.out, job="evaluate_amg"):
        return {"job": "evaluate_amg", **run_amg_evaluation(cfg)}


if __name__ == "__main__":
    run_job(main)
