"""Reading and writing the data that flows between stages: shards, decoded images, partitions, embeddings, prompts."""
