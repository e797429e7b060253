"""Dense -> Mixture-of-Experts checkpoint conversion ("upcycling").

    python -m tagmoe_dist.upcycle --src DENSE_DIR --dst MOE_DIR --num-experts 8 --top-k 2 --format hf

Layout: `options.py` (validated flags), `recipes.py` (pure tensor functions), `archs.py`
(supported architectures, config translation, output names), `plan.py` (output plan),
`hf.py` (streaming safetensors reader/writer), `convert.py` (the conversion), `__main__.py` (CLI).
"""

from tagmoe_dist.upcycle.convert import METADATA_NAME, upcycle
from tagmoe_dist.upcycle.options import UpcycleOptions

__all__ = ["METADATA_NAME", "UpcycleOptions", "upcycle"]
