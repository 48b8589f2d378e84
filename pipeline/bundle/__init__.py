"""Stage 5: the versioned artifact bundle: building it (build, tables) and opening it (reader)."""
