"""Stage 6: memorization audits of a text-to-image model against a bundle (jobs/audit.py)."""
