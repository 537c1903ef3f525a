"""The method registry: name -> adapter class, the one extension point of the project.

Adding a method:
  1. one file in this folder with a subclass of AdapterLinear (base.py) that writes out delta_weight(),
     merged_weight() and forward(), and sets OPTIONS = {option: default} if it has options (lora.py is the shortest
     example, dora.py one with an option);
  2. one line in METHODS below (and, if you like, its display name in DISPLAY; the name itself is used otherwise);
  3. its first-order form in tests/test_adapters.py (first_order_weight), which the property tests ask for.
inject_adapters, adapter files, `make compare ARGS='--methods yours'`, make tune, make bench, make tour and the property
tests (which iterate over METHODS) pick it up; tests/test_registry.py registers a toy method and checks each. The
presets name the methods the paper compares: a choice of what to run, not a second registry.
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
    """The registry name of an adapter layer's class (or of the registered class it derives from: a fused layer is
    the method it fuses)."""
    names = {cls: name for name, cls in METHODS.items()}
    for cls in type(layer).__mro__:
        if cls in names:
            return names[cls]
    raise ValueError(f"{type(layer).__name__} is not registered in METHODS")
