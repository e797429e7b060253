"""Diffusers MMDiTs (Qwen-Image, Flux, SD3) with TAG-MoE image-stream FFNs: the TAG-MoE paper's
own setting (docs/diffusion.md).

    import tagmoe_dist as tm
    transformer = tm.diffusers.convert(transformer, moe_blocks="last:10", task_schema=schema,
                                       groups=tm.ParallelGroups.build(ep_size=2))
    with tm.diffusers.tasks(transformer, task_ids):
        out = transformer(hidden_states=..., encoder_hidden_states=..., timestep=..., ...)

`load_authors_state_dict` / `authors_state_dict`: the authors' checkpoint layout (MegaBlocks dMoE inside
`transformer_blocks.{i}.img_mlp`). Importing this package imports diffusers.
"""

from tagmoe_dist.integrations.diffusers.block import DiffusersMoE
from tagmoe_dist.integrations.diffusers.convert import (PAPER_MOE, TaskTransformer,
                                                        UpcycleOptions, combine_scale, convert, info,
                                                        last_align, moe_blocks, moe_layers,
                                                        set_aux_loss_scale, tasks)
from tagmoe_dist.integrations.diffusers.families import SUPPORTED, parse_moe_blocks
from tagmoe_dist.integrations.diffusers.megablocks import (authors_state_dict, dmoe_to_layer,
                                                           layer_to_dmoe, load_authors_state_dict,
                                                           read_safetensors)

__all__ = ["PAPER_MOE", "SUPPORTED", "DiffusersMoE", "TaskTransformer", "UpcycleOptions",
           "authors_state_dict", "combine_scale", "convert", "dmoe_to_layer", "info", "last_align",
           "layer_to_dmoe", "load_authors_state_dict", "moe_blocks", "moe_layers",
           "parse_moe_blocks", "read_safetensors", "set_aux_loss_scale", "tasks"]
