"""NeuroAda's multi-process check: every rank holds the same connection indices.

The sharded-weight helpers every method uses live in :mod:`neuroada_plugin.kit.sharded`.
"""

from __future__ import annotations

import torch

from ..kit.sharded import world_size

__all__ = ["RankDisagreementError", "check_rank_agreement"]


class RankDisagreementError(RuntimeError):
    """Processes of one job hold different NeuroAda connection indices."""


def _index_checksums(model: torch.nn.Module) -> torch.Tensor:
    """Per-layer checksums of every ``neuroada_indices`` buffer: ``[layers, 3]`` int64."""
    rows = []
    for name, buffer in sorted(model.named_buffers()):
        if ".neuroada_indices." not in f".{name}":
            continue
        values = buffer.detach().to("cpu", torch.int64).reshape(-1)
        if buffer.is_meta or values.numel() == 0:
            rows.append([-1, -1, -1])
            continue
        weights = torch.arange(1, values.numel() + 1, dtype=torch.int64) % 1_000_003
        rows.append([values.numel(), int(values.sum()), int((values * weights).sum())])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def check_rank_agreement(model: torch.nn.Module, group=None) -> int:
    """Verify that every rank holds the same NeuroAda indices; returns the number of index buffers.

    A collective: every rank of ``group`` (default: the world) must call it. Meant for after the
    model state has been synchronised (DDP construction, FSDP ``sync_module_states``, accelerate's
    RAM-efficient loading broadcast); raises :class:`RankDisagreementError` naming the ranks and
    buffers that differ. A no-op returning the local count when no process group is up.
    """
    local = _index_checksums(model)
    world = world_size(group)
    if world == 1:
        return local.shape[0]
    device = torch.device("cpu")
    if torch.distributed.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count, group=group)
    if len({int(c) for c in counts}) != 1:
        raise RankDisagreementError(
            f"NeuroAda index buffers per rank differ: {[int(c) for c in counts]} (ranks built different adapters)."
        )
    gathered_prints = [torch.zeros_like(local, device=device) for _ in range(world)]
    torch.distributed.all_gather(gathered_prints, local.to(device), group=group)
    names = [n for n, _ in sorted(model.named_buffers()) if ".neuroada_indices." in f".{n}"]
    for rank, other in enumerate(gathered_prints):
        other = other.cpu()
        if not torch.equal(other, local):
            bad = [names[i] for i in range(len(names)) if not torch.equal(other[i], local[i])]
            raise RankDisagreementError(
                f"NeuroAda connection indices differ between this rank and rank {rank} in {len(bad)} buffer(s), "
                f"e.g. {bad[:3]}. Synchronise the model state from rank 0 (DDP does at construction, FSDP with "
                "sync_module_states=True) or select from identical weights on every rank."
            )
    return local.shape[0]
