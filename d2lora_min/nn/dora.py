"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

LoRA updates the *direction* of each output row; a learned vector sets each row's *magnitude*.
"""

import torch.nn as nn
import torch.nn.functional as F

from .base import AdapterLinear, check_bool, rescale_add, row_factor, row_norm


class DoRALinear(AdapterLinear):
    """V = W0 + s * B @ A;   W = (m / norm(V))[:, None] * V = c W0 + c dW,   c = m / norm(V),   dW = s * B @ A

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

    forward() applies W = c W0 + c dW through the factors (z = dropout(x) @ A.T), with c folded into the rows of B:
        y = c * (x @ W0.T) + z @ (s c B).T + b

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
        W0, dW = self.base.weight, self.delta_weight()  # (out, in) each
        c = row_factor(self.magnitude, W0 + dW, self.detach_norm)  # m / norm(V): (out,)
        return (c[:, None] * W0 + c[:, None] * dW).to(W0.dtype)  # W = c W0 + c dW: (out, in), row i has norm |m[i]|

    def forward(self, x):  # x: (..., in)
        W0, b, B = self.base.weight, self.base.bias, self.lora_B
        V = W0 + self.delta_weight()  # (out, in): only its row norms are used
        c = row_factor(self.magnitude, V, self.detach_norm)  # m / norm(V): (out,)
        # x @ W.T + b with W = c W0 + c dW: c rescales x @ W0.T, and goes into B's rows on the update's side
        z = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        low = F.linear(z, (self.scaling * c[:, None] * B).to(B.dtype), b)  # x @ (c dW).T + b: (..., out)
        return rescale_add(F.linear(x, W0), c, low)  # c * (x @ W0.T) + low: (..., out)
