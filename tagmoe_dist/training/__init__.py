"""Pieces of the training entry point (tagmoe_dist.train): metrics. Checkpoints: tagmoe_dist.checkpoint."""
