"""The data stage: reading sources, cleaning, filtering, deduplicating and mixing documents."""
