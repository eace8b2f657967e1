"""SMoA and NeFT under DDP, FSDP1 (use_orig_params) and FSDP2 (fully_shard) on 2 CPU processes, against one process.

The worker (tests/distributed/methods_worker.py) creates each method's data-free adapter on both ranks
(SMoA: one SVD per layer for its spectral orderings; NeFT: the magnitude selection of its neurons) and
trains 3 AdamW steps per mode, each rank on its half of the global batch. The reference is one process
on the whole batch with the same seed and config: the trained tensors must match it (relative 1e-5),
and both ranks must hold the reference's orderings / neurons bit for bit (each rank derives them from
the same weights; nothing is broadcast). SMoA reads W0 in every forward and backward, which under FSDP
exists whole only inside its unit.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.common import (
    adapter_buffers_of,
    adapter_tensors_of,
    launch,
    make_data,
    method_config,
    reference_model,
    save_base,
)

METHODS = ("smoa", "neft")
MODES = ("ddp", "fsdp1", "fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods_ddp_fsdp")
    base = save_base(out / "base")
    data = make_data(out / "data.pt")
    result = launch("methods_worker.py", out, "--base", str(base), "--data", str(out / "data.pt"), timeout=400)
    references = {}
    for method in METHODS:
        initial = adapter_tensors_of(reference_model(base, data, method_config(method), steps=0)[0])
        model, losses = reference_model(base, data, method_config(method))
        references[method] = {
            "initial": initial,
            "tensors": adapter_tensors_of(model),
            "buffers": adapter_buffers_of(model),
            "losses": losses,
        }
    return {"out": out, "result": result, "references": references}


def _load(runs, method: str, mode: str, what: str, rank: int) -> dict[str, torch.Tensor]:
    error = runs["result"][f"rank{rank}"][f"{method}_{mode}"].get("error")
    assert error is None, f"{method} under {mode} failed on rank {rank}:\n{error}"
    return torch.load(runs["out"] / f"{method}_{mode}_{what}_rank{rank}.pt")


@pytest.mark.parametrize("method", METHODS)
def test_the_reference_trains_every_adapter_tensor(runs, method):
    reference = runs["references"][method]
    assert reference["tensors"]
    for key, value in reference["tensors"].items():
        assert not torch.equal(value, reference["initial"][key]), f"{method} {key} did not move"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_trained_tensors_equal_one_process(runs, method, mode):
    reference = runs["references"][method]["tensors"]
    tensors = _load(runs, method, mode, "tensors", 0)
    assert tensors.keys() == reference.keys()
    flat = torch.cat([tensors[k].float().reshape(-1) for k in sorted(reference)])
    flat_reference = torch.cat([reference[k].float().reshape(-1) for k in sorted(reference)])
    relative = float((flat - flat_reference).norm() / flat_reference.norm())
    assert relative < 1e-5, f"{method} under {mode} differs from one process by {relative:.3g} (relative)"
    # The mean of the ranks' half-batch losses is the one-process loss on the whole batch.
    losses = [runs["result"][f"rank{r}"][f"{method}_{mode}"]["losses"] for r in (0, 1)]
    mean = [(a + b) / 2 for a, b in zip(*losses, strict=True)]
    assert mean == pytest.approx(runs["references"][method]["losses"], rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_both_ranks_derive_the_reference_orderings_and_neurons(runs, method, mode):
    reference = runs["references"][method]["buffers"]
    assert reference, f"{method} has no adapter buffers"
    for rank in (0, 1):
        buffers = _load(runs, method, mode, "buffers", rank)
        assert buffers.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(buffers[key], value), f"{method} {mode} rank {rank}: {key} differs"
