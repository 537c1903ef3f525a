"""D2-LoRA: a signed low-rank residual, projected onto the pretrained row norms, plus the residual once more
(Fujisawa & Kondo, 2026, arXiv 2602.14728).

Two rank-r branches, one added and one subtracted, form the update dW. During training the adapted weight
W0 + dW is projected onto the norms of the pretrained weight's rows, and dW is added to the projection once more.
After training the whole layer collapses into one plain matrix (merge), so inference costs nothing extra. Where
each of these points comes from (the paper's public record, or this project's own choice) is tabled in
docs/DESIGN.md, "D2-LoRA: the paper's form".

What it does, to first order. Per row i, with u_i = W0_i / norm(W0_i), split the update into the part that
stretches the row, rad_i = (dW_i . u_i) u_i, and the part that turns it, tan_i = dW_i - rad_i. Up to terms of order
norm(dW_i)^2 / norm(W0_i):
    LoRA                        W = W0 + tan + rad         (exactly)
    D2-LoRA, the paper's form   W = W0 + 2 tan + rad       (the projection keeps tan, the re-added dW adds tan + rad)
    D2-LoRA, exact-norm form    W = W0 + tan               (it only turns)
    DoRA                        W = W0 + tan + (m - norm(W0)) u
So the paper's form is a LoRA of rank 2r that turns each row twice as far as its update alone would, and stretches
it as far. Under Adam, whose steps do not grow with the gradient's scale, doubling the turning part of an update acts
like a larger learning rate for it (tests/nn/test_adapters.py checks these forms; `make tune` measures how far
D2-LoRA's accuracy-vs-lr curve sits from LoRA(2r)'s, docs/RESULTS.md). The bound |norm(W_i) - norm(W0_i)| <= norm(dW_i) holds here, but LoRA meets it
too (triangle inequality): it does not tell the methods apart.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AdapterLinear, check_bool, check_real, rescale_add, row_factor, row_norm


class D2LoRALinear(AdapterLinear):
    """dW = s * (B_pos @ A_pos - tau * B_neg @ A_neg);   V = W0 + dW;   P(V) = (t / norm(V))[:, None] * V;   W = P(V) + dW

    W0           = self.base.weight (out, in), frozen; bias b = self.base.bias, frozen
    A_pos, A_neg = self.lora_A_pos, self.lora_A_neg (r, in),  Kaiming-uniform like nn.Linear, drawn independently
    B_pos, B_neg = self.lora_B_pos, self.lora_B_neg (out, r), zeros, so dW = 0 and W = W0 at initialisation
    tau          = self.tau, a scalar: fixed at tau_init (a buffer) by default, or learned (learn_tau=True)
    t            = self.target_norm (out,) = norm(W0), a buffer fixed when the layer is wrapped
    norm(V)      = L2 norm of each output row, over in_features -> (out,)
    s            = self.scaling = alpha / r
    Trainable parameters: 2r * (in + out) = LoRA(2r)'s (+ 1 with a learned tau).

    P(V) puts row i of W0 + dW on the sphere of radius norm(W0_i) (exactly, for rows with norm(V_i) >= eps); the
    re-added dW then moves it off the sphere again. Written with c = t / norm(V), the weight is
        W = P(V) + dW = c W0 + (c + 1) dW
    (W0 only rescaled; the update enters with weight c + 1, about 2), and forward() applies it through the factors
    (z = dropout(x) @ A.T, stacked factors), with c + 1 folded into the rows of the (out, 2r) factor B:
        y = c * (x @ W0.T) + z @ (s (c + 1) B).T + b

    What tau does: tau * B_neg can be rescaled into B_neg, so tau adds no expressiveness; fixed, it sets the size
    of the negative branch's contribution relative to its weights (and, under Adam, its effective step size).

    Options:
      readd_delta=False drops the second dW: W = P(V), every row exactly at norm(W0_i) (the exact-norm form).
      project=False drops the projection: W = V = W0 + dW, the signed residual alone (readd_delta then changes
        nothing: it is a LoRA of rank 2r).
      learn_tau=True makes tau a trainable scalar, initialised to tau_init.
      detach_norm=True treats norm(V) as a constant in backward, as DoRA does. With the default False the gradient
        flows through norm(V) too: then the part of dL/dV_i that reaches it through P(V) has no component along V_i
        (scaling a row of V leaves P(V) unchanged); the re-added dW passes its gradient on as LoRA's would. Whether
        attaching the norm helps training is a hypothesis that `make ablate` tests (docs/DESIGN.md).

    W0 is frozen: its row norms are taken once, when the layer is wrapped. Change W0 afterwards and you
    must wrap it again.
    """

    OPTIONS = {"tau_init": 0.5, "learn_tau": False, "project": True, "readd_delta": True, "detach_norm": False}

    def __init__(
        self,
        base,
        r,
        alpha,
        dropout=0.0,
        tau_init=0.5,
        learn_tau=False,
        project=True,
        readd_delta=True,
        detach_norm=False,
    ):
        super().__init__(base, r, alpha, dropout)
        self.tau_init = check_real("tau_init", tau_init)
        self.learn_tau = check_bool("learn_tau", learn_tau)
        self.project = check_bool("project", project)
        self.readd_delta = check_bool("readd_delta", readd_delta)
        self.detach_norm = check_bool("detach_norm", detach_norm)
        self.lora_A_pos = self._new_lora_A()  # (r, in)
        self.lora_B_pos = self._new_lora_B()  # (out, r)
        self.lora_A_neg = self._new_lora_A()  # (r, in)
        self.lora_B_neg = self._new_lora_B()  # (out, r)
        w = base.weight
        tau = torch.tensor(self.tau_init, device=w.device, dtype=w.dtype)  # scalar
        if not torch.isfinite(tau):  # e.g. 1e39 in float32, 1e5 in float16: inf * B_neg = NaN at initialisation
            raise ValueError(f"tau_init={self.tau_init!r} is not finite in the weights' dtype {w.dtype}")
        if self.learn_tau:
            self.tau = nn.Parameter(tau)
        else:
            self.register_buffer("tau", tau)
        # The norms to preserve, taken once from the pretrained weight and never recomputed.
        self.register_buffer("target_norm", row_norm(w).detach().to(w.dtype))  # (out,)

    def derived_buffers(self):
        fixed = {} if self.learn_tau else {"tau": self.tau}  # a fixed tau is tau_init, never trained
        return {"target_norm": self.target_norm, **fixed}

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
        W0, dW = self.base.weight, self.delta_weight()  # (out, in) each
        if not self.project:
            return W0 + dW  # W = V: (out, in)
        c = row_factor(self.target_norm, W0 + dW, self.detach_norm)  # t / norm(V): (out,)
        c_dW = (
            c + 1 if self.readd_delta else c
        )  # the update's weight: P(V) + dW = c W0 + (c + 1) dW, P(V) = c W0 + c dW
        return (c[:, None] * W0 + c_dW[:, None] * dW).to(W0.dtype)  # (out, in)

    def forward(self, x):  # x: (..., in)
        W0, b = self.base.weight, self.base.bias
        A, B = self.stacked_factors()  # (2r, in), (out, 2r)
        if not self.project:
            return F.linear(x, W0, b) + self._low_rank(x, A, B)  # x @ (W0 + dW).T + b: (..., out)
        V = W0 + self.scaling * B @ A  # (out, in): only its row norms are used
        c = row_factor(self.target_norm, V, self.detach_norm)  # t / norm(V): (out,)
        c_dW = c + 1 if self.readd_delta else c  # as in merged_weight: W = c W0 + (c + 1) dW, or c W0 + c dW
        # x @ W.T + b: c rescales x @ W0.T, and c_dW goes into B's rows on the update's side
        z = F.linear(self.lora_dropout(x), A)  # (..., 2r)
        low = F.linear(z, (self.scaling * c_dW[:, None] * B).to(B.dtype), b)  # x @ (c_dW dW).T + b: (..., out)
        return rescale_add(F.linear(x, W0), c, low)  # c * (x @ W0.T) + low: (..., out)
