"""The adapters and how to put them into a model.

    from d2lora_min.nn import LoRALinear, DoRALinear, D2LoRALinear, METHODS
    from d2lora_min.nn import inject_adapters, merge_adapters, adapter_state_dict, load_adapter_state_dict

Read lora.py, dora.py, d2lora.py in that order (each leans on base.py for what they share): their forward() is what
runs. fused.py is an opt-in optimisation of the last two (set_fused swaps its subclasses in; the method files never
import it); inject.py puts adapters into models, checkpoint.py saves and loads them.
"""

from .base import NORM_EPS, AdapterLinear, norm_dtype, row_factor, row_norm
from .checkpoint import adapter_config, adapter_state_dict, load_adapter_state_dict, load_adapters, save_adapters
from .d2lora import D2LoRALinear
from .dora import DoRALinear
from .fused import set_fused
from .inject import (
    DEFAULT_TARGETS,
    adapter_layers,
    check_options,
    inject_adapters,
    merge_adapters,
    trainable_parameters,
)
from .lora import LoRALinear
from .registry import METHODS, display_name, get_method

__all__ = [
    "AdapterLinear",
    "LoRALinear",
    "DoRALinear",
    "D2LoRALinear",
    "METHODS",
    "NORM_EPS",
    "DEFAULT_TARGETS",
    "row_norm",
    "row_factor",
    "norm_dtype",
    "get_method",
    "display_name",
    "check_options",
    "inject_adapters",
    "merge_adapters",
    "adapter_layers",
    "adapter_config",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapters",
    "load_adapters",
    "trainable_parameters",
    "set_fused",
]
