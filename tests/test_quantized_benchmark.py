"""Smoke test of ``benchmarks/quantized.py --quick``: every (base, method) row present, sane, and the
trainable counts are the methods' definitions (NeuroAda k=1: ``sum(out)``; LoRA r=8: ``8 * sum(in + out)``),
the same on the fp32 and the 4-bit base; on nf4 every projection was replaced by a Linear4bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_quantized_benchmark_quick_run(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "benchmarks/quantized.py", "--quick", "--device", "cpu", "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    payload = json.loads((tmp_path / "quantized-cpu-quick.json").read_text())
    assert payload["machine"]["bitsandbytes"] and payload["loadavg_start"] is not None
    # Quick stand-ins (benchmarks/efficiency.py QUICK_MODELS): 2 layers of q, k, v, o, gate, up, down.
    shapes = {"smollm2": (64, 160, 32), "llama7b_2l": (128, 344, 128)}  # hidden, intermediate, kv out
    for key, (hidden, mlp, kv) in shapes.items():
        rows = {(r["base"], r["method"]): r for r in payload["models"][key]["rows"]}
        # Every method whose spec lists bnb_4bit (NeuroAda, NEAT) with its default config, LoRA and the frozen base.
        methods = ("frozen_backward", "neuroada_k1", "neat_r8", "lora_r8")
        assert set(rows) == {(b, m) for b in ("fp32", "nf4") for m in methods}
        layers = [
            (hidden, hidden),
            (hidden, kv),
            (hidden, kv),
            (hidden, hidden),
            (hidden, mlp),
            (hidden, mlp),
            (mlp, hidden),
        ]
        neuroada = 2 * sum(out for _, out in layers)
        lora = 2 * sum(8 * (inp + out) for inp, out in layers)
        neat = 2 * sum(2 * 8 * out for _, out in layers)  # A [r, out] and B [out, r], depth 0
        for (base, method), row in rows.items():
            assert row["ok"], row
            result = row["result"]
            assert result["trainable"] == {"frozen_backward": 0, "neuroada_k1": neuroada, "neat_r8": neat, "lora_r8": lora}[method]
            assert result["quantized_layers"] == (14 if base == "nf4" else 0)
            assert result["peak_bytes"] >= result["before_step_bytes"] > 0 and result["step_s"] > 0
