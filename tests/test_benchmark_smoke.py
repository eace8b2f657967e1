"""Smoke test of ``benchmarks/layer_memory.py --quick``: it runs end to end and reports sane rows.

Correctness only: the benchmark's numbers are never compared with each other here (wall-clock
and RSS depend on the machine and its load). What must hold on any machine: every
configuration produced a row, every measurement is positive, and the trainable-parameter
counts are the method's definition (NeuroAda: exactly ``out * k``; Super-Tuning: the same
budget as NeuroAda k=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "layer_memory.py"
EXPECTED_CONFIGS = {"frozen", "neuroada_k1", "neuroada_k20", "lora_r8", "dense_k1", "supertuning_k1"}


def test_layer_memory_quick_run_writes_complete_results(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    payload = json.loads((tmp_path / "layer_memory-cpu-float32-quick.json").read_text())
    assert (tmp_path / "layer_memory-cpu-float32-quick.md").is_file()
    for key in ("machine", "command", "timestamp", "loadavg_start", "rows", "targets"):
        assert key in payload, key
    for key in ("cpu_model", "logical_cores", "ram_gib", "torch", "peft", "python"):
        assert payload["machine"][key], key

    rows = payload["rows"]
    errors = [row for row in rows if "error" in row]
    assert not errors, errors
    shapes = {row["shape"] for row in rows}
    assert len(shapes) >= 2
    for shape in shapes:
        assert {row["config"] for row in rows if row["shape"] == shape} == EXPECTED_CONFIGS, shape

    for row in rows:
        label = f"{row['shape']}/{row['config']}"
        assert row["median_step_s"] > 0 and row["min_step_s"] > 0, label
        assert len(row["step_times_s"]) == row["reps"] >= 1, label
        assert row["step_peak_bytes"] > 0, label
        assert isinstance(row["extra_step_bytes"], int), label
        if row["config"] == "frozen":
            assert row["trainable_params"] == 0 and row["adapter_state_bytes"] == 0, label
            continue
        assert row["trainable_params"] > 0 and row["adapter_state_bytes"] > 0, label
        assert row["time_vs_lora"] > 0 and row["step_peak_vs_lora"] > 0, label
        if row["config"].startswith(("neuroada_k", "dense_k")):
            assert row["trainable_params"] == row["out_features"] * row["k"], label
        if row["config"] == "supertuning_k1":
            assert row["trainable_params"] == row["out_features"], label
        if row["config"] == "lora_r8":
            assert row["trainable_params"] == 8 * (row["in_features"] + row["out_features"]), label

    targets = {(t["shape"], t["config"]) for t in payload["targets"]}
    assert targets == {(shape, "neuroada_k1") for shape in shapes}
