"""python -m tagmoe_dist.checkpoint export --help"""

import sys

from tagmoe_dist.checkpoint.cli import main


def _export_hf(args) -> int:
    # --format hf: a Hugging Face directory (integrations/hf/export.py, docs/hf.md)
    from tagmoe_dist.integrations.hf.export import main as export_hf_main
    return export_hf_main(args)


if __name__ == "__main__":
    sys.exit(main(exporters={"hf": _export_hf}))
