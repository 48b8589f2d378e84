"""Stage 4: the FAISS similarity index over an embedding folder (jobs/build_index.py)."""
