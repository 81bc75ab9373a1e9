"""Cached decoding, sampling and restoring checkpoints for inference."""
