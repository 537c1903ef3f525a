"""The method registry: name -> adapter class, the one extension point of the project.

Adding a method:
  1. one file in this folder with a subclass of AdapterLinear (base.py) that writes out delta_weight(),
     merged_weight() and forward(), and sets OPTIONS = {option: default} if it has options (lora.py is the shortest
     example, dora.py one with an option);
  2. one line in METHODS below (and, if you like, its display name in DISPLAY; the name itself is used otherwise);
  3. its first-order form, an entry of FIRST_ORDER in tests/helpers.py, which the property tests ask for;
  4. its golden cases for porters: its math in d2lora_min/reference.py and its cases in scripts/make_golden.py, then
     `make golden` (tests/nn/test_golden.py requires cases for every registered method).
inject_adapters, adapter files, `d2lora compare --methods yours`, tune, bench, tour and the property tests (which
iterate over METHODS) pick it up; tests/nn/test_registry.py adds a toy method (tests/nn/toy_method.py) exactly so and
runs the method-generic tests on it. The presets name the methods the paper compares: a choice of what to run, not a
second registry.
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
