"""TRL SFTTrainer and DPOTrainer with NeuroAdaConfig under ``accelerate launch`` (2 CPU processes, DDP),
against the same script in one process on the same global batch.

The worker (tests/distributed/trl_worker.py) trains 3 steps of each trainer on a dataset that is exactly
one global batch (4 rows), so both runs see the same rows per step; it is launched with the accelerate
config shipped for the TRL examples (examples/trl/accelerate/cpu_2proc.yaml).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.distributed.common import ROOT, _free_port, assert_theta_close

ACCELERATE = ROOT / ".venv" / "bin" / "accelerate"


def _run(command: list[str], out) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    env.pop("NEUROADA_PLUGIN_METHODS", None)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    worker = str(ROOT / "tests" / "distributed" / "trl_worker.py")
    single, multi = tmp_path_factory.mktemp("trl1"), tmp_path_factory.mktemp("trl2")
    one = _run([sys.executable, worker, "--out", str(single), "--base", str(tiny_llama_dir), "--world", "1"], single)
    launcher = [str(ACCELERATE) if ACCELERATE.exists() else "accelerate", "launch"]
    config = ["--config_file", str(ROOT / "examples" / "trl" / "accelerate" / "cpu_2proc.yaml")]
    port = ["--main_process_port", str(_free_port())]
    args = [worker, "--out", str(multi), "--base", str(tiny_llama_dir), "--world", "2"]
    two = _run([*launcher, *config, *port, *args], multi)
    return {"one": one, "two": two, "single": single, "multi": multi}


def _adapter(folder) -> tuple[dict, dict]:
    state = load_file(folder / "adapter_model.safetensors")
    theta = {k: v for k, v in state.items() if ".neuroada_theta" in k}
    indices = {k: v for k, v in state.items() if ".neuroada_indices" in k}
    return theta, indices


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_two_processes_train_theta_like_one_process(runs, trainer):
    assert runs["two"]["world"] == 2 and runs["one"]["world"] == 1
    assert runs["two"]["sharding"] == {"sft": "ddp", "dpo": "ddp"}
    theta_two, indices_two = _adapter(runs["multi"] / trainer)
    theta_one, indices_one = _adapter(runs["single"] / trainer)
    assert len(theta_one) == 14 and indices_two.keys() == indices_one.keys()
    assert all((indices_two[k] == indices_one[k]).all() for k in indices_one)
    assert_theta_close(theta_two, theta_one)
    assert runs["two"][trainer] == pytest.approx(runs["one"][trainer], rel=1e-5)


def test_dpo_reference_is_the_disabled_adapter_on_every_rank(runs):
    # theta = 0 at step 1: policy == reference, so the loss is -log(sigmoid(0)) = ln 2 and margins are 0.
    assert runs["two"]["dpo"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["two"]["dpo_margins"][0] == pytest.approx(0.0, abs=1e-6)
    assert runs["two"]["dpo"][-1] < math.log(2) - 1e-3
