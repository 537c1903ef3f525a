"""A method added the way d2lora_min/nn/registry.py says, for tests/nn/test_registry.py: rsLoRA (LoRA with the
rank-stabilised scaling alpha / sqrt(r); Kalajdzievski, 2023, arXiv 2312.03732).

  1. its class, a subclass of AdapterLinear written out like lora.py (here, not in d2lora_min/nn/: a test adds it);
  2. its line in METHODS (register());
  3. its first-order form in tests/helpers.py's FIRST_ORDER (register()).

Loaded as a pytest plugin (`pytest -p tests.nn.toy_method ...`) it registers the method before the tests are collected
and points the suite's method-generic tests (helpers.TESTED_METHODS) at it alone.
"""

import math

import torch.nn.functional as F

import d2lora_min.nn.registry as registry
from d2lora_min.nn import AdapterLinear
from d2lora_min.nn.base import check_bool

from .. import helpers

NAME = "rslora"


class RSLoRALinear(AdapterLinear):
    """W = W0 + s * B @ A with s = alpha / sqrt(r) (rank_stabilized=False: LoRA's alpha / r)

    A = self.lora_A (r, in), Kaiming-uniform like nn.Linear; B = self.lora_B (out, r), zeros.
    Trainable parameters: r * (in + out).
    """

    OPTIONS = {"rank_stabilized": True}

    def __init__(self, base, r, alpha, dropout=0.0, rank_stabilized=True):
        super().__init__(base, r, alpha, dropout)
        self.rank_stabilized = check_bool("rank_stabilized", rank_stabilized)
        self.scaling = self.alpha / (math.sqrt(self.r) if rank_stabilized else self.r)
        self.lora_A = self._new_lora_A()  # (r, in)
        self.lora_B = self._new_lora_B()  # (out, r)

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A  # (out, in)

    def merged_weight(self):
        return self.base.weight + self.delta_weight()

    def forward(self, x):  # x: (..., in)
        return F.linear(x, self.base.weight, self.base.bias) + self._low_rank(x, self.lora_A, self.lora_B)


def first_order(layer, W0, u, tan, rad):
    return W0 + tan + rad, True  # W0 + dW, exactly (like LoRA)


def register(setitem=lambda mapping, key, value: mapping.__setitem__(key, value)):
    """Steps 2 and 3: the registry line and the first-order form (setitem: monkeypatch.setitem, for a test)."""
    setitem(registry.METHODS, NAME, RSLoRALinear)
    setitem(helpers.FIRST_ORDER, NAME, first_order)


def pytest_configure(config):
    register()
    helpers.TESTED_METHODS = (NAME,)
