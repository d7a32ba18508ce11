"""Datasets (TFDS array_record sources), continual scenarios and the batch sampler."""
