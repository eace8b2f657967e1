"""SAFE with the plain Transformers ``Trainer`` under DDP (2 CPU processes, gloo), against one process.

The worker (tests/distributed/safe_worker.py) trains 12 AdamW steps per method (NeuroAda top-2, PEFT LoRA,
and NeuroAda freezing from the input side with non-reentrant gradient checkpointing, where SAFE also cuts
the graph at the embedding output) with ``SAFECallback`` on settings that freeze blocks from step 3. Both
ranks must decide alike (the scores are averaged over the ranks, each probing its own rows) and freeze
without DDP touching the frozen parameters. The reference is one process on the same global batch (the
dataset is one global batch) without SAFE, freezing the same parameters by hand at the same steps: the
2-rank run must end equal to it.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.common import WORLD, assert_theta_close, launch
from tests.distributed.safe_worker import METHODS, STEPS, ReplayFreezes, losses, train

REFUSAL = "SAFECallback under DDP needs find_unused_parameters=True"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("safe_ddp")
    result = launch("safe_worker.py", out)
    tensors = {
        method: [torch.load(out / f"{method}_params_rank{rank}.pt") for rank in range(WORLD)] for method in METHODS
    }
    return {"out": out, "result": result, "tensors": tensors}


def _ranks(runs, method) -> tuple[dict, dict]:
    return runs["result"]["rank0"][method], runs["result"]["rank1"][method]


def _unit_params(unit: str, names) -> list[str]:
    return [name for name in names if name.startswith(unit + ".")]


@pytest.mark.parametrize("method", METHODS)
def test_ranks_score_and_freeze_alike(runs, method):
    rank0, rank1 = _ranks(runs, method)
    for info in (rank0, rank1):
        assert info["world"] == WORLD and info["wrapped"] == "DistributedDataParallel"
        assert info["find_unused_parameters"] is True  # ddp_find_unused_parameters unset: Trainer's default
        assert len(info["units"]) == 4
    # Each rank probes its own rows, so agreeing scores come from the all-reduce, not from equal inputs.
    assert rank0["probe_input_ids"] != rank1["probe_input_ids"]
    assert rank0["history"] == rank1["history"]
    assert rank0["freeze_steps"] == rank1["freeze_steps"]
    assert 1 <= len(rank0["freeze_steps"]) <= 2  # max_frozen_fraction=0.5 of 4 blocks
    assert all(step > 2 for step in rank0["freeze_steps"].values())  # after the 2-step warm-up
    assert [check["step"] for check in rank0["history"]] == list(range(1, 7))  # check_every=1 until step 6


def test_freezing_the_lowest_block_cuts_the_graph_below_it_on_both_ranks(runs):
    """With checkpointing the embedding output requires grad; once block 0 is frozen, block 0's input no longer does."""
    for info in _ranks(runs, "neuroada_input"):
        lowest = info["freeze_steps"].get("base_model.model.model.layers.0")
        assert lowest is not None and list(info["freeze_steps"]) == ["base_model.model.model.layers.0"]
        recorded = {int(step): flag for step, flag in info["block0_input_requires_grad"].items()}
        assert recorded == {step: step <= lowest for step in range(1, STEPS + 1)}


@pytest.mark.parametrize("method", METHODS)
def test_frozen_params_stay_identical_on_both_ranks_without_grad_or_optimizer_state(runs, method):
    rank0, rank1 = _ranks(runs, method)
    tensors = runs["tensors"][method]
    names = tensors[0]["final"].keys()
    # Exactly each frozen unit's parameters stopped training, at the unit's freeze step, on both ranks.
    expected = {name: step for unit, step in rank0["freeze_steps"].items() for name in _unit_params(unit, names)}
    assert expected and rank0["frozen_at"] == rank1["frozen_at"] == expected
    for info, rank in zip((rank0, rank1), tensors, strict=True):
        assert info["grad_mismatch"] == []  # no gradient on frozen params, one on every training param
        assert info["optimizer_state"] == sorted(set(names) - set(expected))
        for name in expected:
            assert torch.equal(rank["final"][name], rank["at_freeze"][name]), name
    for name in names:  # DDP keeps every parameter equal across ranks; frozen ones bit-identical
        if name in expected:
            assert torch.equal(tensors[0]["final"][name], tensors[1]["final"][name]), name
            assert torch.equal(tensors[0]["at_freeze"][name], tensors[1]["at_freeze"][name]), name
        else:
            torch.testing.assert_close(tensors[0]["final"][name], tensors[1]["final"][name], rtol=1e-6, atol=1e-7)
    # Training went on after the last freeze.
    last = tensors[0]["at_last_freeze"]
    assert any(not torch.equal(tensors[0]["final"][n], last[n]) for n in names if n not in expected)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_end_like_one_process_with_the_same_freezes_replayed(runs, method, tmp_path):
    rank0, _ = _ranks(runs, method)
    plan: dict[int, list[str]] = {}
    for name, step in rank0["frozen_at"].items():
        plan.setdefault(step, []).append(name)
    trainer, model = train(method, tmp_path, world=1, callbacks=[ReplayFreezes(plan)])
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if n in runs["tensors"][method][0]["final"]}
    final = runs["tensors"][method][0]["final"]
    assert_theta_close(final, reference)
    assert rank0["losses"] == pytest.approx(losses(trainer), rel=1e-5)


def test_find_unused_parameters_false_is_refused_with_the_reason(tmp_path):
    with pytest.raises(AssertionError) as failed:
        launch("safe_worker.py", tmp_path, "--methods", "neuroada", "--find-unused", "false")
    assert REFUSAL in str(failed.value)
    assert "frozen adapters get no gradient" in str(failed.value)
