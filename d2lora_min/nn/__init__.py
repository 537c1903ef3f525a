"""The adapters and how to put them into a model.

    from d2lora_min.nn import LoRALinear, DoRALinear, D2LoRALinear, METHODS
    from d2lora_min.nn import inject_adapters, merge_adapters, adapter_state_dict, load_adapter_state_dict

Read base.py, lora.py, dora.py, d2lora.py in that order; inject.py puts them into models.
"""

from .base import NORM_EPS, AdapterLinear, row_norm, row_scale
from .d2lora import D2LoRALinear
from .dora import DoRALinear
from .inject import (
    DEFAULT_TARGETS,
    adapter_config,
    adapter_layers,
    adapter_state_dict,
    check_options,
    get_method,
    inject_adapters,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    save_adapters,
    trainable_parameters,
)
from .lora import LoRALinear
from .registry import METHODS

__all__ = [
    "AdapterLinear",
    "LoRALinear",
    "DoRALinear",
    "D2LoRALinear",
    "METHODS",
    "NORM_EPS",
    "DEFAULT_TARGETS",
    "row_norm",
    "row_scale",
    "get_method",
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
]
