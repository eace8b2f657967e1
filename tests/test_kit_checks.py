"""The refusals that follow from a method's flags (neuroada_plugin/kit/tuner.py), for specs of every shape.

The built-in methods cover some flag combinations; these specs cover the others, so that a third
method with any flags gets the refusal its flags imply, with one wording.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroada_plugin.errors import UnsupportedTargetError
from neuroada_plugin.kit.tuner import check_target
from neuroada_plugin.registry import MethodSpec


def _spec(**flags) -> MethodSpec:
    return MethodSpec(name="probe", config="probe.config:ProbeConfig", tuner="probe.model:ProbeModel", **flags)


def test_a_method_that_reads_its_weight_at_creation_refuses_meta_weights_unless_loading():
    meta = nn.Linear(8, 4, device="meta")
    spec = _spec(reads_weights_when_created=True, supports_sharding=False)
    with pytest.raises(UnsupportedTargetError, match=r"Probe cannot adapt layer: its weight is on the meta device"):
        check_target(spec, meta, "layer")
    check_target(spec, meta, "layer", loading=True)  # a saved adapter brings what creation would read
    check_target(_spec(reads_weights_when_created=True, supports_sharding=True), meta, "layer")
    check_target(_spec(reads_weights_when_created=False), meta, "layer")


def test_a_sharded_weight_is_refused_by_methods_that_read_it_without_sharding_support():
    shard = nn.Linear(8, 4)
    shard.weight.data = torch.empty(0)
    shard.weight.ds_id, shard.weight.ds_shape = 0, (4, 8)  # what a DeepSpeed ZeRO-3 partition carries
    for flags in ({"reads_weights_in_forward": True}, {"reads_weights_when_created": True}):
        with pytest.raises(UnsupportedTargetError, match=r"Probe cannot adapt layer: its weight is a \(0,\) shard"):
            check_target(_spec(**flags, supports_sharding=False), shard, "layer")
        check_target(_spec(**flags, supports_sharding=True), shard, "layer")  # gathered for each read
    check_target(_spec(reads_weights_when_created=False, reads_weights_in_forward=False), shard, "layer")


def test_a_flat_weight_that_is_not_a_zero3_partition_cannot_be_read_by_any_method():
    flat = nn.Linear(8, 4)
    flat.weight.data = torch.empty(0)  # no ds_id / ds_shape: nothing can gather it
    for flags in ({"reads_weights_in_forward": True}, {"reads_weights_when_created": True}):
        for supports_sharding in (False, True):
            with pytest.raises(UnsupportedTargetError, match=r"its weight is a \(0,\) shard"):
                check_target(_spec(**flags, supports_sharding=supports_sharding), flat, "layer")
    check_target(_spec(reads_weights_when_created=False, reads_weights_in_forward=False), flat, "layer")


class _Quantized(nn.Linear):
    quant_state = object()


def test_quantized_and_non_linear_targets_are_refused_with_one_wording():
    with pytest.raises(UnsupportedTargetError, match=r"Probe cannot adapt q \(_Quantized\): it is quantized.*"
                       r"Probe needs the floating-point weight"):  # fmt: skip
        check_target(_spec(), _Quantized(8, 4), "q")
    with pytest.raises(UnsupportedTargetError, match=r"Supported quantized layers: bitsandbytes Linear4bit"):
        check_target(_spec(quantized_layers=("bnb_4bit",)), _Quantized(8, 4), "q")
    with pytest.raises(UnsupportedTargetError, match=r"Probe cannot adapt emb \(Embedding\): only torch\.nn\.Linear"):
        check_target(_spec(), nn.Embedding(10, 4), "emb")
