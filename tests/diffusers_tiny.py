"""Tiny diffusers MMDiTs built from configs (nothing downloaded) and their inputs, for the
tests of tagmoe_dist.integrations.diffusers."""

from __future__ import annotations

import torch

QWEN_TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


def _randomise(model, seed: int):
    # diffusers zero-initialises nothing we rely on, but its default scales make the FFN's
    # contribution small; a wider draw makes any difference in the MoE path visible
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.05))
    return model.eval()


def qwen(seed: int = 0, **over):
    from diffusers import QwenImageTransformer2DModel
    return _randomise(QwenImageTransformer2DModel(**{**QWEN_TINY, **over}), seed)


def flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel
    return _randomise(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=8,
        axes_dims_rope=(4, 6, 6)), seed)


def sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel
    return _randomise(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16), seed)


def qwen_inputs(batch: int = 2, h: int = 4, w: int = 4, text: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[0, -1] = 0                                     # one padded text token
    return dict(hidden_states=torch.randn(batch, h * w, QWEN_TINY["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(batch, text, QWEN_TINY["joint_attention_dim"],
                                                  generator=g),
                encoder_hidden_states_mask=mask, timestep=torch.rand(batch, generator=g),
                img_shapes=[[(1, h, w)]] * batch, return_dict=False)


def flux_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = w = 4
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)),
                                     indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(batch, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g),
                timestep=torch.rand(batch, generator=g), img_ids=ids, txt_ids=torch.zeros(5, 3),
                return_dict=False)


def sd3_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g),
                timestep=torch.rand(batch, generator=g) * 1000, return_dict=False)


BUILDERS = {"qwen": (qwen, qwen_inputs), "flux": (flux, flux_inputs), "sd3": (sd3, sd3_inputs)}
