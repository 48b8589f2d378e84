"""Stage 2: shards -> open_clip image/text embeddings, pHash and optional SSCD in LAION layout (jobs/embed.py)."""
