"""Sharded base weights (DeepSpeed ZeRO-3): the full shape, and the values of one layer for the length of a block.

Under ZeRO-3 every parameter built inside ``deepspeed.zero.Init`` (what ``from_pretrained``
does when ZeRO-3 is configured) holds 0 local elements; its full shape is ``param.ds_shape``
and its values exist only while a ``deepspeed.zero.GatheredParameters`` context is open. A
method that reads the base weight (selection, a fingerprint, a weight-dependent update) or
edits a few of its entries (merge) gathers one layer at a time through :func:`gathered`.
Everything here is a no-op for ordinary tensors (DDP, FSDP, one process), and ``deepspeed`` is
imported only when a partitioned parameter is actually seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["agree_across_ranks", "full_shape", "gathered", "is_partitioned", "world_size"]

logger = logging.getLogger(__name__)


def is_partitioned(tensor: object) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (it carries ``ds_id`` and ``ds_shape``)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The full (logical) shape of ``tensor``: ``ds_shape`` for a ZeRO-3 parameter, else ``shape``."""
    return torch.Size(tensor.ds_shape) if is_partitioned(tensor) else tensor.shape


def _needs_gather(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose values are not on this rank right now.

    Parameters already gathered by an outer context (TRL's GRPO vLLM sync gathers the whole model
    before it merges; DeepSpeed's forward hooks gather a module's parameters) are used as they are:
    DeepSpeed refuses nested gathers of one parameter, and the outer context owns the write-back.
    """
    if not is_partitioned(param):
        return False
    status = getattr(param, "ds_status", None)
    return status is None or getattr(status, "name", str(status)) == "NOT_AVAILABLE"


@contextmanager
def gathered(params: Iterable[torch.Tensor | None], modifier_rank: int | None = None) -> Iterator[None]:
    """Make the full values of ``params`` available for the duration of the block.

    A no-op unless some of them are ZeRO-3 partitioned. Those not on this rank are gathered with
    ``deepspeed.zero.GatheredParameters``: ``modifier_rank=None`` reads only (changes are dropped
    on exit); ``modifier_rank=0`` writes rank 0's values back into every rank's partition, so
    in-place edits (merge/unmerge) persist. Every rank of the parameters' process group must enter
    the block (the gather is a collective), and every rank must make the same edits.

    Parameters that are already gathered are used as they are (DeepSpeed refuses nested gathers of
    one parameter). If an enclosing ``GatheredParameters`` holds them, it owns the write-back (TRL's
    GRPO vLLM sync gathers the whole model read-only, merges, reads and unmerges). If DeepSpeed's own
    forward hooks hold them (after a forward, ZeRO-3 keeps parameters it expects to reuse), their
    release would drop an edit, so with ``modifier_rank`` set this rank's partition is refreshed
    from the edited values when the block ends.
    """
    params = [p for p in params if p is not None and is_partitioned(p)]
    todo = [p for p in params if _needs_gather(p)]
    held = [p for p in params if not _needs_gather(p) and getattr(p, _CONTEXT_DEPTH, 0) == 0]
    if not todo:
        yield
    else:
        import deepspeed  # only reached with ZeRO-3 parameters, i.e. when deepspeed is in use

        with deepspeed.zero.GatheredParameters(todo, modifier_rank=modifier_rank):
            yield
    if modifier_rank is not None:
        for param in held:
            _refresh_partition(param)


# Set by DeepSpeed (>= 0.18) on parameters inside a user's GatheredParameters context.
_CONTEXT_DEPTH = "_ds_z3_gathered_param_context_depth"


def _refresh_partition(param: torch.Tensor) -> None:
    """Copy this rank's slice of the (gathered, edited) full ``param`` into its ZeRO-3 partition."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return
    size = partition.numel()
    rank = torch.distributed.get_rank(group=param.ds_process_group) if torch.distributed.is_initialized() else 0
    flat = param.data.reshape(-1)
    start = size * rank
    count = max(0, min(size, flat.numel() - start))
    if count:
        with torch.no_grad():
            partition.narrow(0, 0, count).copy_(flat.narrow(0, start, count))


def _group_of(param: torch.Tensor | None):
    return getattr(param, "ds_process_group", None) if param is not None else None


def world_size(group=None) -> int:
    """Processes in ``group`` (1 when no process group is up)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def agree_across_ranks(indices: torch.Tensor, *, like: torch.Tensor | None = None, where: str = "") -> torch.Tensor:
    """Rank 0's ``indices``, broadcast to every rank of ``like``'s process group (a collective).

    For what a method derives from a gathered ZeRO-3 weight (NeuroAda's selected connections): all
    ranks then hold bit-identical values by construction, whatever the kernels did. A rank whose own
    result differed logs a warning (the gathered weights or the kernels differed between ranks).
    Returns ``indices`` unchanged when no process group is up.
    """
    group = _group_of(like)
    if world_size(group) == 1:
        return indices
    reference = indices.clone()
    source = 0 if group is None else torch.distributed.get_global_rank(group, 0)
    torch.distributed.broadcast(reference, src=source, group=group)
    if not torch.equal(reference, indices):
        differing = int((reference != indices).any(dim=1).sum())
        logger.warning(
            "%s: this rank derived different values than rank 0 in %d row(s); using rank 0's.",
            where or "layer",
            differing,
        )
    return reference
