"""LoRA: a low-rank residual added to a frozen weight (Hu et al., 2021, arXiv 2106.09685)."""

import torch.nn.functional as F

from .base import AdapterLinear


class LoRALinear(AdapterLinear):
    """W = W0 + s * B @ A

    W0 = self.base.weight (out, in), frozen; bias b = self.base.bias, frozen
    A  = self.lora_A (r, in),  Kaiming-uniform like nn.Linear
    B  = self.lora_B (out, r), zeros, so W = W0 at initialisation
    s  = self.scaling = alpha / r
    Trainable parameters: r * (in + out).
    """

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.lora_A = self._new_lora_A()  # (r, in)
        self.lora_B = self._new_lora_B()  # (out, r)

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A  # (out, r) @ (r, in) -> (out, in)

    def merged_weight(self):
        return self.base.weight + self.delta_weight()  # (out, in)

    def forward(self, x):  # x: (..., in)
        # x @ W.T + b = (x @ W0.T + b) + s * (x @ A.T) @ B.T: the factors, never an (out, in) matrix
        return F.linear(x, self.base.weight, self.base.bias) + self._low_rank(x, self.lora_A, self.lora_B)  # (..., out)
