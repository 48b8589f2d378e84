"""The demo: real photographs with planted duplicates served over local HTTP, and the full chain on them."""
