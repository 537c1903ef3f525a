"""D2-LoRA: a signed low-rank residual with a norm-preserving projection
(Fujisawa & Kondo, 2026, arXiv 2602.14728).

Two rank-r branches, one added and one subtracted, form the update; during training every output row
of the adapted weight is projected back to the norm it had in the pretrained weight. After training
the whole layer collapses into one plain matrix (merge), so inference costs nothing extra.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import NORM_EPS, AdapterLinear, row_norm, row_scale, scale_rows


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

    Options:
      project=False drops the projection: W = V, the signed residual alone.
      detach_norm=True treats norm(V) as a constant in backward (as DoRA does). With the default False
        the gradient flows through the projection and loses its radial component: each row's update
        can turn the row but not stretch it (docs/PORTING.md, section 5, has the formula).
      tau_init=0.5 and a learned tau are this project's choices (DESIGN.md, section 2).

    W0 is frozen: its row norms are taken once, when the layer is wrapped. Change W0 afterwards and you
    must wrap it again.
    """

    OPTIONS = {"tau_init": 0.5, "learn_tau": True, "project": True, "detach_norm": False}

    def __init__(
        self, base, r, alpha, dropout=0.0, tau_init=0.5, learn_tau=True, project=True, detach_norm=False
    ):
        super().__init__(base, r, alpha, dropout)
        self.tau_init = float(tau_init)
        self.learn_tau = bool(learn_tau)
        self.project = bool(project)
        self.detach_norm = bool(detach_norm)
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
        self.register_buffer("target_norm", row_norm(w).detach().clone())  # (out,)

    def options(self):
        return {
            "tau_init": self.tau_init,
            "learn_tau": self.learn_tau,
            "project": self.project,
            "detach_norm": self.detach_norm,
        }

    def _stacked_factors(self):
        """Both branches as one rank-2r pair, so each costs one matmul instead of two:

        B_pos @ A_pos - tau * B_neg @ A_neg  ==  [B_pos, -tau * B_neg] @ [A_pos; A_neg]
        """
        A = torch.cat([self.lora_A_pos, self.lora_A_neg], dim=0)  # (2r, in)
        B = torch.cat([self.lora_B_pos, -self.tau * self.lora_B_neg], dim=1)  # (out, 2r)
        return A, B

    def delta_weight(self):
        A, B = self._stacked_factors()
        return self.scaling * B @ A  # s * (B_pos @ A_pos - tau * B_neg @ A_neg): (out, in)

    def merged_weight(self):
        V = self.base.weight + self.delta_weight()  # (out, in)
        if not self.project:
            return V
        c = row_scale(self.target_norm, row_norm(V), self.detach_norm)  # t / norm(V): (out,)
        return c[:, None] * V  # (out, in): row i has norm t[i]

    def _v_norm(self, A, B):
        """norm(V) for V = W0 + s * B @ A, without forming V (out, in): expand the square of each row,

            norm(V_i)^2 = norm(W0_i)^2 + 2 s <B_i, (W0 @ A.T)_i> + s^2 B_i (A @ A.T) B_i^T

        with norm(W0_i) = t_i (W0 is frozen). One (out, in) @ (in, 2r) matmul and no weight-sized tensor, so
        backward through the norm stays cheap and keeps no (out, in) activation (measured: make bench).
        """
        s = self.scaling
        P = F.linear(self.base.weight, A)  # W0 @ A.T: (out, 2r)
        G = A @ A.T  # Gram matrix of the stacked down-projections: (2r, 2r)
        sq = self.target_norm**2 + 2 * s * (B * P).sum(dim=1) + s * s * ((B @ G) * B).sum(dim=1)  # (out,)
        return sq.clamp_min(NORM_EPS**2).sqrt()  # (out,); the clamp also keeps sqrt's gradient finite at 0

    def forward(self, x):  # x: (..., in)
        A, B = self._stacked_factors()  # (2r, in), (out, 2r)
        # x @ V.T = x @ W0.T + s * (x @ A.T) @ B.T, through the factors
        h = F.linear(x, self.base.weight) + self._low_rank(x, A, B)  # (..., out)
        if not self.project:
            return h if self.base.bias is None else h + self.base.bias  # (..., out)
        c = row_scale(self.target_norm, self._v_norm(A, B), self.detach_norm)  # t / norm(V): (out,)
        # x @ W.T + b = c * (x @ V.T) + b; scale_rows keeps the output, not h, for backward (see base.py)
        return scale_rows(h, c, self.base.bias)  # (..., out)
