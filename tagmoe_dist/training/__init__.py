"""Pieces of the training entry point (tagmoe_dist.train): checkpoints and metrics."""
