"""Stage 0: URL lists -> img2dataset webdataset shards (jobs/download.py)."""
