"""Smoke tests of the benchmarks' ``--quick`` modes (``accuracy.py``, ``efficiency.py``): end to end, sane rows.

Correctness only: the benchmark's numbers are never compared with each other here (wall-clock
and RSS depend on the machine and its load). What must hold on any machine: every
configuration produced a row, every measurement is positive, and the trainable-parameter
counts are the method's definition (NeuroAda: exactly ``out * k``; Super-Tuning: the same
budget as NeuroAda k=1; LoRA: ``r * (in + out)``; full fine-tuning: every weight).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCURACY_SCRIPT = REPO_ROOT / "benchmarks" / "accuracy.py"


def _run_quick(script: Path, output_dir: Path, *extra: str) -> None:
    """Run a benchmark script's ``--quick`` mode in a fresh interpreter; fail with its output tail."""
    completed = subprocess.run(
        [sys.executable, str(script), "--quick", *extra, "--output-dir", str(output_dir)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _projection_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of the 7 attention/MLP projections of every layer of a Llama-shaped model."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    layer = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden)]
    layer += [(hidden, inter), (hidden, inter), (inter, hidden)]
    return layer * config["num_hidden_layers"]


def _run_accuracy_quick(output_dir: Path) -> dict:
    _run_quick(ACCURACY_SCRIPT, output_dir)
    return json.loads((output_dir / "accuracy-quick.json").read_text())


def test_accuracy_quick_run_reports_every_method_and_resumes(tmp_path: Path) -> None:
    payload = _run_accuracy_quick(tmp_path)
    for name in ("accuracy-quick.md", "accuracy-quick.png", "accuracy-quick-runs.jsonl"):
        assert (tmp_path / name).is_file(), name
    for key in ("machine", "command", "timestamp", "git", "loadavg_start", "loadavg_end", "settings", "verdict"):
        assert key in payload, key
    assert payload["machine"]["torch"] and payload["git"]["commit"]
    assert not payload["failures"]
    rows = ["zero_shot", "neuroada_k1", "neuroada_k20", "lora_r8", "full_ft", "neat_r8", "smoa_r16", "neft_select",
            "smoa_r8", "neft_share0.004"]  # fmt: skip
    assert payload["runs_executed"] == len(payload["runs"]) == len(rows) and payload["runs_cached"] == 0
    summary = payload["summary"]
    assert list(summary) == rows

    shapes = _projection_shapes(payload["model_config"])
    expected = {
        "zero_shot": 0,
        "neuroada_k1": sum(out for _, out in shapes),
        "neuroada_k20": sum(out * min(20, in_) for in_, out in shapes),
        "lora_r8": sum(8 * (in_ + out) for in_, out in shapes),
        "neat_r8": sum(2 * 8 * out for _, out in shapes),  # A [r, out] + B [out, r]
        "smoa_r16": sum(8 * (in_ + out) for in_, out in shapes),  # 2 blocks of rank 8 cover every row and column
        "smoa_r8": sum(4 * (in_ + out) for in_, out in shapes),
    }
    base_total = summary["zero_shot"]["total_params"]
    for name, row in summary.items():
        assert row["heldout_n_questions"] == payload["settings"]["heldout_size"] == 8, name
        assert len(row["heldout_accuracies"]) == 1 and 0.0 <= row["heldout_mean"] <= 1.0, name
        assert row["peak_bytes"] > 0 and row["memory_loaded_bytes"] > 0, name
        if name == "zero_shot":
            assert row["trainable_params"] == 0 and row["chosen_lr"] is None
            continue
        assert row["chosen_lr"] == payload["grids"][name][0] and len(row["grid"]) == 1, name
        assert row["train_s_mean"] > 0 and row["peak_train_bytes"] > 0, name
        if name == "full_ft":
            assert row["trainable_params"] == row["total_params"] == base_total
            assert row["trainable_pct"] == 100.0
        elif name.startswith("neft"):  # whole neurons up to 0.4% of all parameters, short by less than one
            hidden = payload["model_config"]["hidden_size"]
            assert 0.004 * base_total - hidden < row["trainable_params"] <= 0.004 * base_total, name
            assert row["total_params"] == base_total + row["trainable_params"], name
            if name == "neft_select":  # the paper's selection, by the package's command; its cost is reported
                (cost,) = row["selection"]
                assert cost["steps"] == payload["settings"]["steps"] and cost["seconds"] > 0, cost
                assert cost["peak_memory_bytes"] > 0, cost
        else:
            assert row["trainable_params"] == expected[name], name
            assert row["total_params"] == base_total + expected[name], name
    trained_runs = [run for run in payload["runs"] if run["method"] != "zero_shot"]
    assert len(trained_runs) == len(rows) - 1 and all(
        run["steps_done"] == payload["settings"]["steps"] == 2 for run in trained_runs
    )
    assert payload["verdict"]["available"]

    # Same command again: every run comes from the JSONL cache, same numbers.
    again = _run_accuracy_quick(tmp_path)
    assert again["runs_executed"] == 0 and again["runs_cached"] == len(rows)
    assert {n: r["heldout_mean"] for n, r in again["summary"].items()} == {
        n: r["heldout_mean"] for n, r in summary.items()
    }


EFFICIENCY_SCRIPT = REPO_ROOT / "benchmarks" / "efficiency.py"
EFFICIENCY_CONFIGS = {
    "frozen_backward",
    "full_ft",
    "masked_ft",
    "lora_r8",
    "supertuning",
    "shira",
    "dense_neuroada_k1",
    "neuroada_k1",
    "neuroada_k20",
    "neat_r8",
    "peanut_r8",
    "smoa_r8",
    "smoa_r16",
    "hira_r8",
    "neft_share0.004",
    "lora_neft_count",
    "masked_neft",
}


def test_efficiency_quick_run_writes_complete_results(tmp_path: Path) -> None:
    _run_quick(EFFICIENCY_SCRIPT, tmp_path, "--device", "cpu")

    payload = json.loads((tmp_path / "efficiency-cpu-float32-quick.json").read_text())
    assert (tmp_path / "efficiency-cpu-float32-quick.md").is_file()
    assert (tmp_path / "efficiency-cpu-float32-quick.png").stat().st_size > 0
    for key in ("machine", "command", "timestamp", "git", "loadavg_start", "rows", "targets", "models"):
        assert key in payload, key
    for key in ("cpu_model", "logical_cores", "ram_gib", "torch", "transformers", "peft", "python"):
        assert payload["machine"][key], key

    rows = payload["rows"]
    assert not [row for row in rows if "error" in row]
    models = {spec["key"]: spec for spec in payload["models"]}
    assert set(models) == {"smollm2", "llama7b_2l"}
    for key, spec in models.items():
        by_config = {row["config"]: row for row in rows if row["model"] == key}
        assert set(by_config) == EFFICIENCY_CONFIGS, key
        for config, row in by_config.items():
            label = f"{key}/{config}"
            for field in ("peak_bytes", "peak_over_weights_bytes", "loaded_bytes", "median_step_s", "median_cpu_s"):
                assert row[field] > 0, (label, field)
            assert row["added_over_floor_bytes"] == (
                row["peak_over_weights_bytes"] - by_config["frozen_backward"]["peak_over_weights_bytes"]
            ), label
            if config == "frozen_backward":
                assert row["trainable_params"] == 0 and row["optimizer_params"] == 0, label
                continue
            assert row["trainable_params"] > 0 and row["optimizer_params"] >= row["trainable_params"], label
            assert 0 < row["trainable_pct"] <= 100, label
            assert row["time_vs_lora"] > 0 and row["peak_over_weights_vs_lora"] > 0, label

        # Exact budgets, computed from the model's config (not from what the script reports).
        dims = _projection_shapes(spec["llama"])
        out_sum = sum(out for _, out in dims)
        in_out_sum = sum(i + o for i, o in dims)
        assert by_config["neuroada_k1"]["trainable_params"] == out_sum, key
        assert by_config["neuroada_k1"]["optimizer_params"] == out_sum, key
        assert by_config["neuroada_k20"]["trainable_params"] == 20 * out_sum, key
        assert by_config["dense_neuroada_k1"]["trainable_params"] == out_sum, key
        assert by_config["supertuning"]["trainable_params"] == out_sum, key
        assert by_config["masked_ft"]["trainable_params"] == out_sum, key
        assert by_config["masked_ft"]["optimizer_params"] == sum(i * o for i, o in dims), key
        assert by_config["lora_r8"]["trainable_params"] == 8 * in_out_sum, key
        assert by_config["shira"]["trainable_params"] == payload["shira_r"] * in_out_sum, key
        assert by_config["full_ft"]["trainable_pct"] == 100.0, key
        # NEAT and PEANuT at r=8, depth 0: A [r, out] + B [out, r] per layer, the same count for both.
        assert by_config["neat_r8"]["trainable_params"] == 2 * 8 * out_sum, key
        assert by_config["peanut_r8"]["trainable_params"] == 2 * 8 * out_sum, key
        # SMoA, 2 blocks of equal rank r/2: every row and column sits in exactly one block; HiRA: LoRA's shapes.
        assert by_config["smoa_r8"]["trainable_params"] == 4 * in_out_sum, key
        assert by_config["smoa_r16"]["trainable_params"] == 8 * in_out_sum, key
        assert by_config["hira_r8"]["trainable_params"] == 8 * in_out_sum, key
        # NeFT (data-free magnitude selection) fills 0.4% of all parameters with whole neurons: at most the
        # budget, short of it by less than one neuron (a row or column of a projection, <= hidden size entries).
        neft = by_config["neft_share0.004"]
        total = round(neft["trainable_params"] / (neft["trainable_pct"] / 100))
        assert 0.004 * total - spec["llama"]["hidden_size"] < neft["trainable_params"] <= 0.004 * total, key
        # The official code's way: the same entries can change, but both MLP matrices get gradients + AdamW state.
        up_down = sum(i * o for position, (i, o) in enumerate(dims) if position % 7 in (5, 6))  # up_proj, down_proj
        assert by_config["masked_neft"]["trainable_params"] == neft["trainable_params"], key
        assert by_config["masked_neft"]["optimizer_params"] == up_down, key
        lora_rank = by_config["lora_neft_count"]["trainable_params"] / in_out_sum
        assert lora_rank == max(1, round(0.004 * total / in_out_sum)), key

    smollm2 = [t for t in payload["targets"] if t["model"] == "smollm2"]
    targets = {t["kind"]: t for t in smollm2 if t["method"] == "neuroada_k1"}
    assert len(targets) == 3 and all(t["value"] > 0 for t in smollm2)
    # Memory checks and the best-round time check decide; the all-steps median is shown beside it.
    binding = [(t["method"], t["kind"]) for t in smollm2 if t["binding"]]
    assert binding == [
        *[("neuroada_k1", "memory")] * 3,
        ("neuroada_k1", "time_best"),
        *[("neat_r8", "memory")] * 2,
        ("neat_r8", "time_best"),
        *[("smoa_r16", "memory")] * 2,
        ("smoa_r16", "time_best"),
        *[("neft_share0.004", "memory")] * 2,
    ]
    rows = {r["config"]: r for r in payload["rows"] if r["model"] == "smollm2"}
    neat_vs_peanut = next(t for t in smollm2 if t["reference"] == "peanut_r8")
    assert neat_vs_peanut["value"] == (
        rows["neat_r8"]["peak_over_weights_bytes"] / rows["peanut_r8"]["peak_over_weights_bytes"]
    )
    rows = {r["config"]: r for r in payload["rows"] if r["model"] == "smollm2"}
    ours, lora = rows["neuroada_k1"], rows["lora_r8"]
    assert targets["time_best"]["value"] == min(ours["round_median_step_s"]) / min(lora["round_median_step_s"])
    assert targets["time"]["value"] == ours["median_step_s"] / lora["median_step_s"]

    # --report-from recomputes the same verdicts from the JSON alone and rewrites the reports in place.
    md_path = tmp_path / "efficiency-cpu-float32-quick.md"
    md_path.unlink()
    completed = subprocess.run(
        [sys.executable, str(EFFICIENCY_SCRIPT), "--report-from", str(tmp_path / "efficiency-cpu-float32-quick.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rebuilt = json.loads((tmp_path / "efficiency-cpu-float32-quick.json").read_text())
    assert rebuilt["targets"] == payload["targets"] and rebuilt["rows"] == payload["rows"]
    assert rebuilt["report_rebuilt"]["git"] and md_path.is_file()


def test_safe_quick_run_reports_each_variant_with_measurements(tmp_path: Path) -> None:
    _run_quick(REPO_ROOT / "benchmarks" / "safe.py", tmp_path, "--methods", "lora_r8", "--variants", "none", "safe")
    payload = json.loads((tmp_path / "safe-quick.json").read_text())
    assert (tmp_path / "safe-quick.md").is_file() and payload["machine"]["torch"]
    runs = {row["variant"]: row for row in payload["runs"]}
    assert set(runs) == {"none", "safe"} and not any("error" in row for row in runs.values())
    for row in runs.values():
        assert row["post_freeze_peak_bytes"] > 0 and row["post_freeze_step_s"] > 0 and row["heldout_n"] == 8
        assert row["post_freeze_from_step"] == 4  # 6 steps: SAFE's default schedule ends at step 3
    assert runs["safe"]["units"] == 2  # the tiny model's two blocks
    assert runs["safe"]["trainable_after"] <= runs["none"]["trainable_after"]
