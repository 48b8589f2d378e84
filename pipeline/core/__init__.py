"""Foundations every stage shares: typed config and flags, crash-safe storage, Ray, the stage contract."""
