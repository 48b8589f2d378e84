"""Stage 2 (jobs/embed.py): shards -> open_clip image/text embeddings, pHash, optional SSCD; LAION layout."""
