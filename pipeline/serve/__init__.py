"""Stage 6: the bundle as a clip-retrieval-compatible kNN service on Ray Serve (jobs/serve_knn.py)."""
