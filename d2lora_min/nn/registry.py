"""The method registry: name -> adapter class, the one extension point of the project.

Adding a method is one file in this folder plus one line in METHODS (a display name in DISPLAY is optional: the
name itself is used otherwise); inject_adapters, adapter files, the compare run (`--methods yours`), make tune,
make bench, make tour and the property tests (which iterate over METHODS) pick it up. The presets name the
methods the paper compares; that is a choice of what to run, not a second registry.
"""

from .d2lora import D2LoRALinear
from .dora import DoRALinear
from .lora import LoRALinear

METHODS = {
    "lora": LoRALinear,
    "dora": DoRALinear,
    "d2lora": D2LoRALinear,
}

DISPLAY = {"lora": "LoRA", "dora": "DoRA", "d2lora": "D2-LoRA"}  # how tables and plots write each name


def get_method(name):
    """The adapter class registered as `name`; a clear error listing the valid names otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def display_name(name):
    return DISPLAY.get(name, name)


def method_name(layer):
    """The registry name of an adapter layer's class."""
    for name, cls in METHODS.items():
        if type(layer) is cls:
            return name
    raise ValueError(f"{type(layer).__name__} is not registered in METHODS")
