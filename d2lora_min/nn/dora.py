"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

LoRA updates the *direction* of each output row; a learned vector sets each row's *magnitude*.
"""

import torch.nn as nn
import torch.nn.functional as F

from . import fused
from .base import AdapterLinear, check_bool, row_factor, row_norm, scale_outputs


class DoRALinear(AdapterLinear):
    """V = W0 + s * B @ A;   W = (m / norm(V))[:, None] * V

    W0 = self.base.weight (out, in), frozen; bias b = self.base.bias, frozen
    A  = self.lora_A (r, in),  Kaiming-uniform like nn.Linear
    B  = self.lora_B (out, r), zeros
    m  = self.magnitude (out,), initialised to norm(W0), so W = W0 at initialisation
    norm(V) = L2 norm of each output row, over in_features -> (out,)
    s  = self.scaling = alpha / r
    Trainable parameters: r * (in + out) + out.

    Row i of W has length |m[i]| whatever B and A are (for rows with norm(V_i) >= eps; below, the guard scales it by
    norm(V_i) / eps): the magnitude alone sets each row's length, and the low-rank update only turns the row. To first order in dW = s * B @ A (per row, u_i = W0_i / norm(W0_i), and
    tan_i = dW_i - (dW_i . u_i) u_i the part of the update that turns the row):
        W_i = W0_i + tan_i + (m_i - norm(W0_i)) u_i        (the factors turn, the magnitude stretches)

    detach_norm=True (default) treats norm(V) as a constant in backward, as the DoRA paper does to save memory
    (sec. 4.3) and as PEFT does; it changes the gradients, not the output.
    """

    OPTIONS = {"detach_norm": True}

    def __init__(self, base, r, alpha, dropout=0.0, detach_norm=True):
        super().__init__(base, r, alpha, dropout)
        self.detach_norm = check_bool("detach_norm", detach_norm)
        self.lora_A = self._new_lora_A()  # (r, in)
        self.lora_B = self._new_lora_B()  # (out, r)
        self.magnitude = nn.Parameter(row_norm(base.weight).detach().to(base.weight.dtype))  # (out,)

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A  # (out, in)

    def merged_weight(self):
        V = self.base.weight + self.delta_weight()  # (out, in)
        c = row_factor(self.magnitude, row_norm(V), self.detach_norm)  # m / norm(V): (out,)
        return (c[:, None] * V).to(V.dtype)  # (out, in): row i has norm |m[i]|

    def forward(self, x):  # x: (..., in)
        if fused.applies(self):  # opt-in (set_fused): the math below as one autograd function, in fused.py
            return fused.dora_forward(self, x)
        W0, b = self.base.weight, self.base.bias
        V = W0 + self.delta_weight()  # (out, in): only its row norms are used
        c = row_factor(self.magnitude, row_norm(V), self.detach_norm)  # m / norm(V): (out,)
        # x @ W.T = c * (x @ V.T) = c * (x @ W0.T + s * (x @ A.T) @ B.T): c scales outputs
        h = F.linear(x, W0) + self._low_rank(x, self.lora_A, self.lora_B)  # (..., out)
        return scale_outputs(h, c, b)  # c * h + b: (..., out)
