"""Names inside a memorizing-models folder (``models/amg-memorizing``), importable without torch."""

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
