"""neuroada-plugin: NeuroAda as a native PEFT method, with TRL, Axolotl and vLLM integrations.

Importing this package registers every method it ships with PEFT (``PeftType.NEUROADA``),
after which ``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``
and ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` accept NeuroAda adapters. When the
distribution is installed, a start-up hook performs this import as soon as ``peft`` is
imported, so a saved adapter loads even in a process that never imports this package.
"""

from .errors import AdapterCheckpointError, MergeError, UnsupportedTargetError
from .neuroada import NeuroAdaConfig, NeuroAdaLayer, NeuroAdaModel, select_connections

__version__ = "0.1.0"

__all__ = [
    "AdapterCheckpointError",
    "MergeError",
    "NeuroAdaConfig",
    "NeuroAdaLayer",
    "NeuroAdaModel",
    "UnsupportedTargetError",
    "select_connections",
]
