"""Reading and writing what flows between stages: shards, decoded images, partitions, embeddings, prompts."""
