"""Names inside a memorizing-models folder (``models/amg-memorizing``), importable without torch."""

TEXT2IMG_DIR = "text2img"
UNCOND_DIR = "uncond"
TRAINING_SET = "training_set.npz"
REFERENCE_PICTURES = "reference_pictures.npz"
MANIFEST = "manifest.json"
