"""File names and ``method`` values of the image-duplicate table, in a module that imports nothing.

The image stage writes them, the report and the bundle read them; keeping them here lets a bundle
consumer know the names without importing the dedup stage (and Ray with it).
"""

OUTPUT_NAME = "image_duplicates.parquet"
SUMMARY_NAME = "image_dedup_summary.json"
METHOD_REPRESENTATIVE = "representative"
METHOD_EXACT = "exact"
METHOD_PHASH = "phash"
METHOD_SEMANTIC = "semantic"
METHOD_TRANSITIVE = "transitive"
PASSES = (METHOD_EXACT, METHOD_PHASH, METHOD_SEMANTIC)
