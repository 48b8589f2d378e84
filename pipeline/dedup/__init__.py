"""Stage 3: duplicate images (exact, pHash, CLIP) and captions (MinHash LSH) -> duplicate tables."""
