"""Names inside a memorizing-models folder (``models/amg-memorizing``), importable without torch."""

from collections.abc import Sequence

TEXT2IMG_DIR = "text2img"
PIXEL_DIR = "pixel"
TRAINING_SET = "training_set.npz"
MANIFEST = "manifest.json"
THRESHOLDS = "amg_thresholds.json"
#: Training rows the text-to-image model's detection searches: the byte-identically duplicated ones
#: (pipeline.audit.matching.DuplicatedRows). Over every row, a new trouser is as close to some
#: training trouser as a copy is to its picture until the last steps (σ of generic samples reaches
#: 0.99 against all rows, measured), too late to steer away.
MATCH_ROWS = "duplicated"
#: The paper's "strong" setting (a larger guidance scale; the paper gives no value): c3 = 3,000, the
#: middle of 300 / 3,000 / 30,000 tried on the planted prompts at calibration seeds 100000–100005
#: (never the evaluation's): 300 left 92% copies, 30,000 destroyed the class (17% accuracy).
STRONG_C3 = 3000.0
#: The demo's AMG on the text-to-image model: σ_t is the RMS pixel distance to the duplicated rows
#: (``l2``), measured on the conditional x̂0 (``AMGConfig.detect_from``), where a copy of this model's
#: planted pictures shows from t ≈ 860 instead of t ≈ 400 (BENCHMARKS.md, "AMG evaluation").
SIMILARITY = "l2"
DETECT_FROM = "conditional"
#: λ_t tables in :data:`THRESHOLDS`: name -> (model, similarity, x̂0 σ is measured on). Each detection
#: needs its own: σ of the conditional x̂0 runs higher, earlier, than σ of the guided one.
THRESHOLD_TABLES: dict[str, tuple[str, str, str]] = {
    "text2img": ("text2img", "sscd", "guided"),
    "text2img_conditional": ("text2img", "sscd", "conditional"),
    "text2img_l2_conditional": ("text2img", "l2", "conditional"),
    "pixel": ("pixel", "nl2", "guided"),
}


def threshold_table(model: str, similarity: str, detect_from: str = "guided") -> str:
    """The name of the λ_t table in :data:`THRESHOLDS` for ``model`` with σ by ``similarity`` on the
    ``detect_from`` x̂0 (``model`` itself for a table outside :data:`THRESHOLD_TABLES`)."""
    wanted = (model, similarity, detect_from)
    return next((name for name, spec in THRESHOLD_TABLES.items() if spec == wanted), model)


#: λ_t calibration seeds: from this offset (the evaluation samples 0..n−1), this many per prompt or
#: class. The pixel model's DDPM trajectories are noisier than DDIM's: a new sample crosses the per-step
#: maximum of 80 calibration trajectories on 12% of its paths, of 800 on none (BENCHMARKS.md).
CALIBRATION_SEED_OFFSET = 100_000
CALIBRATION_SAMPLES = {"text2img": 20, "pixel": 200}


def calibration_seeds(samples: int, offset: int = CALIBRATION_SEED_OFFSET) -> list[int]:
    """The seeds a λ_t table is calibrated on."""
    return list(range(offset, offset + samples))


def fitted_on(table: dict | None, seeds: Sequence[int]) -> bool:
    """Whether a λ_t table of :data:`THRESHOLDS` was calibrated on ``seeds`` (it records the first and
    the last): a table fitted on other seeds is calibrated again."""
    return table is not None and table.get("calibration", {}).get("seeds") == [seeds[0], seeds[-1]]
