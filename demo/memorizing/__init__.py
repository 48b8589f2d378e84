"""Tiny diffusion models trained to memorize the demo pictures, and AMG evaluated on them."""
