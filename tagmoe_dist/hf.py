"""`tagmoe_dist.hf`: Hugging Face models trained with TAG-MoE layers (see docs/hf.md).
Importing it imports transformers; `import tagmoe_dist` does not."""

from tagmoe_dist.integrations.hf import *  # noqa: F401,F403
from tagmoe_dist.integrations.hf import __all__  # noqa: F401
