"""The method registry: name -> adapter class. The one extension point of the project.

Adding a method is one file in this folder plus one line here; inject_adapters, the compare run and
the property tests (which iterate over METHODS) pick it up from this dict.
"""

from .d2lora import D2LoRALinear
from .dora import DoRALinear
from .lora import LoRALinear

METHODS = {
    "lora": LoRALinear,
    "dora": DoRALinear,
    "d2lora": D2LoRALinear,
}
