"""NeuroAda (Zhang et al., 2025): per-neuron top-k sparse fine-tuning as a PEFT method."""

from ..registration import register_method
from .config import NeuroAdaConfig
from .layer import Linear, NeuroAdaLayer
from .model import NeuroAdaModel
from .selection import select_connections

__all__ = ["Linear", "NeuroAdaConfig", "NeuroAdaLayer", "NeuroAdaModel", "select_connections"]

register_method(name="neuroada", config_cls=NeuroAdaConfig, model_cls=NeuroAdaModel, prefix="neuroada_")
