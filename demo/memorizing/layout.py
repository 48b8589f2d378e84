"""Names inside a memorizing-models folder (``models/amg-memorizing``), importable without torch."""

TEXT2IMG_DIR = "text2img"
PIXEL_DIR = "pixel"
TRAINING_SET = "training_set.npz"
MANIFEST = "manifest.json"
THRESHOLDS = "amg_thresholds.json"
