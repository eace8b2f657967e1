"""Smoke test of ``benchmarks/merge_startup.py --quick``: end to end on a ~40 MB checkpoint, sane rows.

Correctness only: timings depend on the machine and its load, so only their presence and sign are
checked here, never the targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "merge_startup.py"


def test_merge_startup_quick_run_writes_complete_results(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output-dir", str(tmp_path), "--workdir", str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    payload = json.loads((tmp_path / "merge_startup-quick.json").read_text())
    assert (tmp_path / "merge_startup-quick.md").is_file()
    for key in ("machine", "command", "git", "timestamp", "help", "merges", "targets", "settings"):
        assert key in payload, key
    assert payload["git"]["commit"] and payload["machine"]["torch"]
    assert set(payload["help"]) == {"neuroada-merge --help", "neuroada-plugin --help"}
    assert all(h["median_s"] > 0 for h in payload["help"].values())
    (row,) = payload["merges"]
    assert row["shards"] == 4 and row["patched_tensors"] > 0 and row["bytes"] > 10e6
    assert row["merge_s"] > 0 and row["cp_s"] > 0 and row["cp_sync_s"] > 0 and row["merge_vs_cp"] > 0
    # The temporary checkpoint is gone.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("merge-startup-")]
