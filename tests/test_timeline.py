"""tools/draw_timeline.py turns a profiler trace into a PNG with one lane per thread."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_timeline_png_from_a_real_profiler_trace(tmp_path):
    import torch
    from torch.profiler import profile
    with profile() as prof:
        a = torch.randn(64, 64)
        for _ in range(3):
            torch.nn.functional.gelu(a @ a).index_select(0, torch.arange(8))
    trace = tmp_path / "t.json"
    prof.export_chrome_trace(str(trace))
    out = tmp_path / "t.png"
    r = subprocess.run([sys.executable, "tools/draw_timeline.py", str(trace), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"traceEvents": []}))
    r = subprocess.run([sys.executable, "tools/draw_timeline.py", str(empty), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no complete" in r.stderr
