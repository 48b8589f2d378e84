"""Stage 1: img2dataset shards -> samples.parquet, one row per input row, ok or rejected (jobs/ingest.py)."""
