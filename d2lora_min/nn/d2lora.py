"""D2-LoRA: a signed low-rank residual with a norm-preserving projection
(Fujisawa & Kondo, 2026, arXiv 2602.14728).

Two rank-r branches, one added and one subtracted, form the update; during training every output row
of the adapted weight is projected back to the norm it had in the pretrained weight. After training
the whole layer collapses into one plain matrix (merge), so inference costs nothing extra.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fast
from .base import AdapterLinear, check_bool, check_real, row_factor, row_norm, scale_outputs


class D2LoRALinear(AdapterLinear):
    """dW = s * (B_pos @ A_pos - tau * B_neg @ A_neg);   V = W0 + dW;   W = (t / norm(V))[:, None] * V

    W0           = self.base.weight (out, in), frozen; bias b = self.base.bias, frozen
    A_pos, A_neg = self.lora_A_pos, self.lora_A_neg (r, in),  Kaiming-uniform like nn.Linear
    B_pos, B_neg = self.lora_B_pos, self.lora_B_neg (out, r), zeros, so W = W0 at initialisation
    tau          = self.tau, a scalar: learned (nn.Parameter) or fixed (buffer), from tau_init
    t            = self.target_norm (out,) = norm(W0), a buffer fixed when the layer is wrapped
    norm(V)      = L2 norm of each output row, over in_features -> (out,)
    s            = self.scaling = alpha / r
    Trainable parameters: 2r * (in + out) (+ 1 for a learned tau) = LoRA(2r)'s (+ 1).

    What it is, geometrically: each output row of W lives on the sphere of radius norm(W0_i); training
    moves it along that sphere and never changes its length. D2-LoRA(r) is a rank-2r LoRA (stacked factors
    [A_pos; A_neg], [B_pos, -tau * B_neg]) followed by that projection; with tau > 0 it equals DoRA(2r) with
    the magnitude frozen at norm(W0) and the norm not detached.

    What tau adds, and what it does not: tau * B_neg can be rescaled into B_neg, so tau adds no
    expressiveness. Its gradient is zero until B_neg moves away from 0. Under Adam it acts as a step size
    of the negative branch. Nothing keeps it positive, so "subtracted" holds only while tau > 0.
    tau_init=0.5 and a learned tau are this project's choices; the paper's ablations also fix tau.

    Options:
      project=False drops the projection: W = V, the signed residual alone.
      detach_norm=True treats norm(V) as a constant in backward (as DoRA does). With the default False
        the gradient flows through the projection and loses its radial component: each row's update can
        turn the row but not stretch it (docs/PORTING.md, section 5). DoRA detaches by default to save
        memory and time (DoRA paper, sec. 4.3, reports no loss in accuracy); its learned magnitude sets each
        row's length anyway. D2-LoRA has no magnitude to learn: attaching the norm makes the gradient itself
        tangent to the sphere, which is the stabilising effect the projection is for (this project's choice).

    W0 is frozen: its row norms are taken once, when the layer is wrapped. Change W0 afterwards and you
    must wrap it again.
    """

    OPTIONS = {"tau_init": 0.5, "learn_tau": True, "project": True, "detach_norm": False}

    def __init__(self, base, r, alpha, dropout=0.0, tau_init=0.5, learn_tau=True, project=True, detach_norm=False):
        super().__init__(base, r, alpha, dropout)
        self.tau_init = check_real("tau_init", tau_init)
        self.learn_tau = check_bool("learn_tau", learn_tau)
        self.project = check_bool("project", project)
        self.detach_norm = check_bool("detach_norm", detach_norm)
        self.lora_A_pos = self._new_lora_A()  # (r, in)
        self.lora_B_pos = self._new_lora_B()  # (out, r)
        self.lora_A_neg = self._new_lora_A()  # (r, in)
        self.lora_B_neg = self._new_lora_B()  # (out, r)
        w = base.weight
        tau = torch.tensor(self.tau_init, device=w.device, dtype=w.dtype)  # scalar
        if self.learn_tau:
            self.tau = nn.Parameter(tau)
        else:
            self.register_buffer("tau", tau)
        # The norms to preserve, taken once from the pretrained weight and never recomputed.
        self.register_buffer("target_norm", row_norm(w).detach().to(w.dtype))  # (out,)

    def derived_buffers(self):
        return {"target_norm": self.target_norm}

    def stacked_factors(self):
        """Both branches as one rank-2r pair (one matmul each instead of two):

        B_pos @ A_pos - tau * B_neg @ A_neg  ==  [B_pos, -tau * B_neg] @ [A_pos; A_neg]
        """
        A = torch.cat([self.lora_A_pos, self.lora_A_neg], dim=0)  # (2r, in)
        B = torch.cat([self.lora_B_pos, -self.tau * self.lora_B_neg], dim=1)  # (out, 2r)
        return A, B

    def delta_weight(self):
        A, B = self.stacked_factors()
        return self.scaling * B @ A  # s * (B_pos @ A_pos - tau * B_neg @ A_neg): (out, in)

    def merged_weight(self):
        V = self.base.weight + self.delta_weight()  # (out, in)
        if not self.project:
            return V
        c = row_factor(self.target_norm, row_norm(V), self.detach_norm)  # t / norm(V): (out,)
        return (c[:, None] * V).to(V.dtype)  # (out, in): row i has norm t[i]

    def forward(self, x):  # x: (..., in)
        if self.project and fast.applies(self):  # the same math, fused: fewer operations, less memory (fast.py)
            return fast.d2lora_forward(self, x)
        W0, b = self.base.weight, self.base.bias
        A, B = self.stacked_factors()  # (2r, in), (out, 2r)
        h = F.linear(x, W0) + self._low_rank(x, A, B)  # x @ V.T = x @ W0.T + s * (x @ A.T) @ B.T: (..., out)
        if not self.project:
            return h if b is None else h + b.to(h.dtype)  # (..., out)
        V = W0 + self.scaling * B @ A  # (out, in): only its row norms are used
        c = row_factor(self.target_norm, row_norm(V), self.detach_norm)  # t / norm(V): (out,)
        return scale_outputs(h, c, b)  # c * h + b: (..., out)
