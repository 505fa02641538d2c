"""Data for GPT training: datasets, samplers that split the global batch over data-parallel ranks, batches."""
