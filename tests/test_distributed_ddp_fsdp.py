"""DDP, FSDP1, FSDP2 and RAM-efficient loading on 2 CPU processes (gloo), against one process.

The worker (tests/distributed/ddp_fsdp_worker.py) trains 3 AdamW steps per mode, each rank on its
half of the global batch; here the single-process run on the whole batch is the reference for
theta, and per-row top-|W| of the saved base weights for the indices.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.common import (
    TOP_K,
    assert_theta_close,
    launch,
    make_data,
    reference_train,
    save_base,
    top_abs_indices,
)

MODES = ("ddp", "fsdp1", "fsdp2", "meta")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_fsdp")
    base = save_base(out / "base")
    data = make_data(out / "data.pt")
    result = launch("ddp_fsdp_worker.py", out, "--base", str(base), "--data", str(out / "data.pt"))
    theta_ref, indices_ref = reference_train(base, data)
    return {"out": out, "base": base, "result": result, "theta": theta_ref, "indices": indices_ref}


@pytest.mark.parametrize("mode", MODES)
def test_theta_after_adamw_steps_equals_one_process(runs, mode):
    theta = torch.load(runs["out"] / f"{mode}_theta.pt")
    assert_theta_close(theta, runs["theta"])


@pytest.mark.parametrize("mode", MODES)
def test_indices_equal_on_both_ranks_and_top_abs(runs, mode):
    weights = load_file(runs["base"] / "model.safetensors")
    rank0 = torch.load(runs["out"] / f"{mode}_indices_rank0.pt")
    rank1 = torch.load(runs["out"] / f"{mode}_indices_rank1.pt")
    assert rank0.keys() == rank1.keys() == runs["indices"].keys()
    for key, indices in rank0.items():
        assert torch.equal(indices, rank1[key]), key
        weight = weights[key.split(".neuroada_indices.")[0] + ".weight"]
        assert torch.equal(indices, top_abs_indices(weight, TOP_K)), key
    for rank in ("rank0", "rank1"):
        assert runs["result"][rank][mode]["agreement_buffers"] == 12


def test_fsdp2_shards_theta(runs):
    assert runs["result"]["rank0"]["fsdp2"]["theta_is_dtensor"]


def test_ram_efficient_loading_rank1_was_meta_and_got_rank0_state(runs):
    """Rank 1 built its adapter on meta weights (no selection possible); its indices came from rank 0."""
    meta = runs["result"]["rank1"]["meta"]
    assert meta["weights_meta_before_broadcast"] and meta["meta_before_broadcast"]
    real = runs["result"]["rank0"]["meta"]
    assert not real["weights_meta_before_broadcast"] and not real["meta_before_broadcast"]
    # identical training on both ranks: rank 1's losses match the DDP run's rank 1 (same weights, same batch)
    assert meta["losses"] == pytest.approx(runs["result"]["rank1"]["ddp"]["losses"], rel=1e-6)


def test_rank_agreement_broadcasts_rank0_and_check_names_the_differing_buffer(runs):
    rank0, rank1 = runs["result"]["rank0"]["agreement"], runs["result"]["rank1"]["agreement"]
    assert rank0["agreed"] == rank1["agreed"] == [[0, 1], [2, 3], [4, 5]]  # rank 1 had [[10, 11], ...]
    for info in (rank0, rank1):
        assert info["check"].startswith("raised: NeuroAda connection indices differ between this rank and rank")
        assert "model.layers.1.mlp.up_proj.neuroada_indices.default" in info["check"]
