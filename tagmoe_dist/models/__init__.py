"""Small reference models for demos, tests and the trainer."""

from tagmoe_dist.models.gpt import GPT, GPTConfig, lm_loss

__all__ = ["GPT", "GPTConfig", "lm_loss"]
