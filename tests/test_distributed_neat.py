"""NEAT under DDP, FSDP1 (use_orig_params) and FSDP2 (fully_shard per decoder layer) on 2 CPU processes, against one process.

The worker (tests/distributed/neat_worker.py) trains 3 AdamW steps per mode, each rank on its half of
the global batch; the single-process run on the whole batch (same seed, so the same random A, B, E, D)
is the reference for the trained tensors, and the saved checkpoint for the base weights. NEAT reads the
whole frozen W0 in forward and again in backward (A's gradient is ``grad @ W0.T``); under FSDP that
weight is only whole inside its unit's forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.common import (
    LR,
    STEPS,
    assert_theta_close,
    launch,
    make_data,
    neat_config,
    neat_of,
    reference_model,
    save_base,
)

MODES = ("ddp", "fsdp1", "fsdp2")
LAYERS = 2 * 6  # two decoder layers, six target projections each


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("neat_ddp_fsdp")
    base = save_base(out / "base")
    data = make_data(out / "data.pt")
    result = launch("neat_worker.py", out, "--base", str(base), "--data", str(out / "data.pt"))
    initial = neat_of(reference_model(base, data, neat_config(), steps=0)[0])
    model, losses = reference_model(base, data, neat_config())
    return {"out": out, "base": base, "result": result, "initial": initial, "neat": neat_of(model), "losses": losses}


def _rank_tensors(runs, mode: str, what: str, rank: int) -> dict[str, torch.Tensor]:
    error = runs["result"][f"rank{rank}"][mode].get("error")
    assert error is None, f"{mode} failed on rank {rank}:\n{error}"
    return torch.load(runs["out"] / f"{mode}_{what}_rank{rank}.pt")


def test_reference_trains_every_neat_tensor(runs):
    reference, initial = runs["neat"], runs["initial"]
    kinds = {key.split(".")[-2] for key in reference}
    assert kinds == {"neat_A", "neat_B", "neat_E", "neat_D"}
    assert len(reference) == 4 * LAYERS
    for key, value in reference.items():
        # Adam's first step moves every coordinate with a gradient by LR: 500x the per-entry tolerance below.
        moved = float((value - initial[key]).abs().max())
        assert moved > 0.5 * LR, f"{key} barely trained ({moved:.2e})"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_neat_tensors_after_adamw_steps_equal_one_process(runs, mode, rank):
    tensors = _rank_tensors(runs, mode, "neat", rank)
    assert assert_theta_close(tensors, runs["neat"]) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_first_step_loss_is_the_global_batch_loss(runs, mode):
    """Step 1 runs on identical parameters everywhere: the mean of the two half-batch losses is the whole batch's."""
    for rank in (0, 1):
        assert runs["result"][f"rank{rank}"][mode].get("error") is None
    halves = [runs["result"][f"rank{rank}"][mode]["losses"][0] for rank in (0, 1)]
    assert sum(halves) / 2 == pytest.approx(runs["losses"][0], rel=1e-6)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_base_weights_untouched(runs, mode, rank):
    saved = load_file(runs["base"] / "model.safetensors")
    base = _rank_tensors(runs, mode, "base", rank)
    assert {key.replace(".base_layer.", ".") for key in base} == set(saved)
    for key, value in base.items():
        assert torch.equal(value, saved[key.replace(".base_layer.", ".")]), key


def test_fsdp2_shards_neat_and_base(runs):
    for rank in (0, 1):
        info = runs["result"][f"rank{rank}"]["fsdp2"]
        assert info.get("error") is None, info.get("error")
        assert info["neat_is_dtensor"] and info["base_is_dtensor"]


def test_fsdp2_frees_w0_after_forward_and_gathers_it_again_for_backward(runs):
    """What the FSDP2 comparison above exercises: NEAT's ``A @ W0`` saves no W0 at all (it reads the weight again
    in backward through the kit, kit/weight_product.py), and every W0 the base matmul saves had its storage freed
    when the forward pass ended and was whole again when backward read it; the trained tensors equal one process
    (above), so NEAT's backward read the whole weight too."""
    full_bytes = {4 * 64 * 64, 4 * 32 * 64, 4 * 128 * 64}  # q/o, k/v, up/down (float32)
    for rank in (0, 1):
        info = runs["result"][f"rank{rank}"]["fsdp2"]
        assert info.get("error") is None, info.get("error")
        after_forward, in_backward = info["saved_w0_bytes_after_forward"], info["saved_w0_bytes_in_backward"]
        # Per step: the base matmul's wherever its input needs a gradient (all but layer 0's q/k/v, which read the
        # frozen embeddings); none of NEAT's.
        assert len(after_forward) == (LAYERS - 3) * STEPS
        assert set(after_forward) == {0}
        assert len(in_backward) == len(after_forward)
        assert set(in_backward) == full_bytes
