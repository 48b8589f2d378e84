"""Offline dataset auditing and deduplication for text-to-image training data, on Ray."""

__version__ = "0.1.0"
