"""The fused path of DoRA and D2-LoRA, opt-in: the same math as the plain forward() in dora.py and d2lora.py, as
one autograd function per layer whose backward is written out by hand. Read those files first: the plain path is
what runs; set_fused(model, True) (or `--fused=true` for make compare) swaps in the subclasses at the end of this
file, and the method files never import it. tests/nn/test_fused.py checks outputs and every gradient against the plain
path (and torch.autograd.gradcheck checks the hand-written backward in float64). What it buys is activation memory,
for DoRA most of all: it keeps for backward only what its backward needs (`make bench` measures both paths side by
side). It computes first derivatives only: a second one (create_graph=True) is refused with a clear error.

Both methods compute, for x (..., in) and xd = dropout(x) (x itself without dropout):

    z   = xd @ A.T                       (..., k)     the low-rank branch's hidden state
    low = s * z @ B.T                    (..., out)   the update through its factors, x @ dW.T
    h   = x @ W0.T + low                 (..., out)   x @ V.T, with V = W0 + s * B @ A
    c   = target / max(norm(V), eps)     (out,)       target = DoRA's magnitude or D2-LoRA's t = norm(W0)
    y   = c * h + b            (+ low with D2-LoRA's readd_delta: the paper's form, y = x @ (P(V) + dW).T + b)

(the plain forward() writes the same y on the merged weight's form c W0 + c' dW, c' = c + 1 or c).

D2-LoRA passes its two branches, stacked inside: A = [A_pos; A_neg] (2r, in), B = [B_pos, -tau * B_neg] (out, 2r).

What it saves, and why it stays exact (the same values up to rounding; the tests hold both paths to one tolerance):
- Autograd state: one node per layer that keeps only what its backward needs, and few new (N, out) tensors (in the
  paper's form x @ W0.T becomes h in place, low becomes y in place). It adds in another order than the plain path.
- The weight-sized V: formed explicitly (W0 + s * B @ A, in float32 for 16-bit weights, as the plain path's norms
  need) without gradient tracking, used for its row norms and for V @ A.T (out, k), which is kept, and dropped.
  Backward needs V only through V @ A.T and (k B).T @ V = (k B).T @ W0 + s ((k B).T @ B) @ A.
- h for dL/dc = sum over tokens of G * h: DoRA and the exact-norm form keep y instead (which the next operation often
  keeps anyway) and recover h = (y - b) / c where c != 0 (D2-LoRA's t_i = 0 needs no dL/dc_i; a DoRA magnitude of
  exactly 0 keeps h), unless the bias dominates a row's output (BIAS_DOMINATES), where y - b would lose c * h's digits.
  The paper's form keeps h. Keeping y has a price: an in-place change of the layer's output before backward raises
  an autograd error (tested).
In 16-bit, c stays float32 and y's last step adds c * h to a sum that varies from token to token, so that a factor near
1 is not rounded away (as in the plain path).

The backward, for G = dL/dy flattened to (N, out), x and xd to (N, in) (docs/PORTING.md, section 5):

    dL/dh   = G * c                                      (N, out)
    dL/dlow = dL/dh + G  (paper's form)   or  dL/dh      (N, out)
    dL/dz   = s * dL/dlow @ B                            (N, k)
    dL/dx   = dL/dh @ W0 + dL/dz @ A   (without dropout; with it, dL/dz @ A is dL/dxd, and dropout's own backward
              multiplies it by mask / (1 - p))
    dL/dB   = s * dL/dlow.T @ z                          (out, k)
    dL/dA   = dL/dz.T @ xd                               (k, in)
    dL/dc   = sum over tokens of G * h                   (out,)
    dL/dtarget = dL/dc / max(norm(V), eps)               (out,)   DoRA's magnitude
    attached norm only (c depends on V through norm(V)):
              k_i = -dL/dc_i * c_i / norm(V_i)^2  (0 where norm(V_i) < eps: past the clamp the norm is constant)
              dL/dV_i = k_i * V_i
              dL/dB += s * dL/dV @ A.T = s * k[:, None] * (V @ A.T)     (V @ A.T kept from forward)
              dL/dA += s * B.T @ dL/dV = s * (k[:, None] * B).T @ W0 + s^2 * ((k[:, None] * B).T @ B) @ A
    D2-LoRA's two branches, from the stacked gradients (B = [B_pos, -tau * B_neg]):
              dL/dA_pos = dL/dA[:r],   dL/dA_neg = dL/dA[r:]
              dL/dB_pos = dL/dB[:, :r]
              dL/dB_neg = -tau * dL/dB[:, r:]
              dL/dtau   = -sum(dL/dB[:, r:] * B_neg)

Mixed precision: under autocast the activations' matmuls run in the autocast dtype (as nn.Linear's would) and
the output has that dtype; V, its norms and c are computed in float32 from the float32 weights.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import NORM_EPS, check_bool, factor_as, norm_dtype
from .d2lora import D2LoRALinear
from .dora import DoRALinear


def _to(t, dtype):
    """t in dtype, without an operator call when it already is (at the small shape every call counts)."""
    return t if t.dtype == dtype else t.to(dtype)


@dataclass(frozen=True)
class Settings:
    """What RowScaledLowRank needs besides tensors."""

    s: float  # the scaling alpha / r
    detach_norm: bool  # treat norm(V) as a constant in backward
    readd: bool  # D2-LoRA's paper form: add the update once more after the projection
    keep_h: bool  # keep h for dL/dc (else keep y and recover h = (y - b) / c)
    grad: bool  # autograd is recording (inside forward it never is): only then is anything kept for backward


# y = c * h + b recovers h = (y - b) / c with y's rounding times (|c h| + |b|) / |c h|: past this ratio of |b_i| to
# the row's mean |c_i h_i| the function keeps h instead (the plain path's accuracy, at the memory cost of h).
BIAS_DOMINATES = 4.0

# The inputs of RowScaledLowRank.apply, in order: ctx.needs_input_grad is read by these names.
INPUTS = ("x", "xd", "W0", "bias", "A", "B", "target", "A_neg", "B_neg", "tau", "settings")


class RowScaledLowRank(torch.autograd.Function):
    """y = c * (x @ W0.T + low) + b (+ low),  low = s * (xd @ A.T) @ B.T,  c = target / max(norm(W0 + s * B @ A), eps).

    x (..., in) in the compute dtype; xd = dropout(x), or None when there is no dropout; W0 (out, in),
    bias (out,) or None, A (r, in), B (out, r), target (out,) in the weights' dtype. W0 and bias are frozen.
    D2-LoRA also passes A_neg (r, in), B_neg (out, r) and tau (DoRA passes None for the three): then the stacked
    pair A = [A; A_neg] (2r, in), B = [B, -tau * B_neg] (out, 2r) is formed here, at no autograd cost.
    """

    @staticmethod
    def forward(ctx, x, xd, W0, bias, A, B, target, A_neg, B_neg, tau, settings):
        s, dt, ndt = settings.s, x.dtype, norm_dtype(W0.dtype)
        if A_neg is not None:  # D2-LoRA's two branches as one rank-2r pair
            A, B = torch.cat([A, A_neg]), torch.cat([B, B_neg * -tau], dim=1)  # (2r, in), (out, 2r)
        lead, (n_out, n_in) = x.shape[:-1], W0.shape
        x2 = x.reshape(-1, n_in)  # (N, in)
        xd2 = x2 if xd is None else xd.reshape(-1, n_in)  # (N, in)
        s_z = F.linear(xd2, _to(A, dt)).mul_(s)  # s * z = s * xd @ A.T: (N, k), the scaling on the small side
        # few new (..., out) tensors (each is a pass over fresh memory); low keeps x's leading dimensions, so that y
        # (made in its memory) is not a view of something else
        h0 = F.linear(x2, _to(W0, dt)).view(*lead, n_out)  # x @ W0.T: (..., out)
        low = F.linear(s_z.view(*lead, s_z.shape[-1]), _to(B, dt))  # s * z @ B.T = x @ dW.T: (..., out)
        V = torch.addmm(_to(W0, ndt), _to(B, ndt), _to(A, ndt), alpha=s)  # (out, in), dropped after its norms
        norm = torch.linalg.vector_norm(V, dim=1)  # L2 over in_features -> (out,)
        c = _to(target, ndt) / norm.clamp_min(NORM_EPS)  # (out,)
        # c stays float32 for 16-bit activations: the last step rounds once (a c near 1 is kept, as in base.rescale_add)
        b = None if bias is None else _to(bias, dt)  # (out,)
        if settings.readd:  # the paper's form: y = (low + b) + c * h, formed in low's memory (low is not needed again)
            h = h0.add_(low)  # x @ W0.T + low = x @ V.T: (..., out)
            y = (low if b is None else low.add_(b)).addcmul_(h, c)  # (..., out)
        else:  # y = (c * low + b) + c * x @ W0.T, in low's memory; h = x @ V.T a tensor of its own (it may be kept)
            h = h0 + low  # (..., out)
            y = (low.mul_(c) if b is None else low.mul_(c).add_(b)).addcmul_(h0, c)  # (..., out)
        del h0

        needs = dict(zip(INPUTS, ctx.needs_input_grad))
        # which gradients backward computes: a factor's, and dL/dc (for the magnitude, or through an attached norm)
        need_factors = settings.grad and any(needs[k] for k in ("A", "B", "A_neg", "B_neg", "tau"))
        need_gc = settings.grad and (needs["target"] or (not settings.detach_norm and need_factors))
        keep_h = settings.keep_h or (need_gc and bias_dominates(h, c, bias))
        kept = (h if keep_h else y) if need_gc else None  # h itself, or y to recover it from
        through_norm = need_gc and need_factors and not settings.detach_norm
        VA = F.linear(V, _to(A, ndt)) if through_norm else None  # V @ A.T: (out, k)
        xd_kept = None if xd is None else xd2
        ctx.save_for_backward(x2, xd_kept, s_z, W0, bias, A, B, target, c, norm, kept, VA, B_neg, tau)
        ctx.settings, ctx.x_shape = settings, x.shape
        ctx.need_factors, ctx.need_gc, ctx.keep_h = need_factors, need_gc, keep_h
        return y

    @staticmethod
    def backward(ctx, G):
        if torch.is_grad_enabled():  # create_graph=True: the backward below is not itself differentiable
            raise RuntimeError(
                "the fused path (nn/fused.py) computes first derivatives only; a second one (create_graph="
                "True, e.g. a gradient penalty) needs the plain path: set_fused(model, False)"
            )
        x2, xd2, s_z, W0, bias, A, B, target, c, norm, kept, VA, B_neg, tau = ctx.saved_tensors
        st, needs = ctx.settings, dict(zip(INPUTS, ctx.needs_input_grad))
        s, dt, ndt = st.s, x2.dtype, c.dtype
        G2 = G.reshape(-1, W0.shape[0])  # (N, out)
        # dL/dh = G * c and dL/dlow = G * c_low scale columns of G; every use multiplies them by W0 or B, so the
        # scaling goes on those (out, in) and (out, k) weights instead of on the (N, out) activations.
        cd = factor_as(c, dt)  # (out,)
        c_low = cd + 1 if st.readd else cd  # dL/dlow = G * c_low: the paper's form adds low once more
        A_dt = _to(A, dt)
        g_z = torch.mm(G2, _to(B, dt) * (s * c_low)[:, None])  # dL/dz = s * (G * c_low) @ B: (N, k)
        grad = dict.fromkeys(INPUTS)
        if needs["x"]:
            grad_x = torch.mm(G2, _to(W0, dt) * cd[:, None])  # dL/dh @ W0 = G @ (c * W0): (N, in)
            if xd2 is None:  # no dropout: the low-rank branch saw x itself
                grad_x.addmm_(g_z, A_dt)
            grad["x"] = grad_x.view(ctx.x_shape)
        if needs["xd"]:
            grad["xd"] = torch.mm(g_z, A_dt).view(ctx.x_shape)  # (..., in)
        grad_A = grad_B = None
        if ctx.need_factors:
            grad_A = _to(torch.mm(g_z.t(), x2 if xd2 is None else xd2), ndt)  # dL/dz.T @ xd: (k, in)
            grad_B = _to(torch.mm(G2.t(), s_z), ndt) * _to(c_low, ndt)[:, None]  # s * (G * c_low).T @ z: (out, k)
        if ctx.need_gc:
            g_c = gradient_of_c(G2, kept, bias, c, ctx.keep_h)  # dL/dc = sum over tokens of G * h: (out,)
            clamped = norm.clamp_min(NORM_EPS)
            if needs["target"]:
                grad["target"] = _to(g_c / clamped, target.dtype)  # dc/dtarget = 1 / norm
            if not st.detach_norm and ctx.need_factors:
                d_A, d_B = through_the_norm(g_c, c, norm, W0, A, B, VA, s)
                grad_A, grad_B = grad_A.add_(d_A), grad_B.add_(d_B)
        if (
            grad_A is not None and B_neg is not None
        ):  # back to the two branches: A = [A_pos; A_neg], B = [B_pos, -tau * B_neg]
            (g_A_pos, g_A_neg), (g_B_pos, g_neg) = grad_A.chunk(2), grad_B.chunk(2, dim=1)  # g_neg = dL/d(-tau * B_neg)
            grad["A"], grad["A_neg"] = _to(g_A_pos, A.dtype), _to(g_A_neg, A.dtype)  # (r, in) each
            grad["B"] = _to(g_B_pos, B.dtype)  # (out, r)
            grad["B_neg"] = _to(-tau * g_neg, B_neg.dtype)  # (out, r)
            if needs["tau"]:  # a learned tau
                grad["tau"] = _to(-(g_neg * _to(B_neg, ndt)).sum(), tau.dtype)  # scalar
        elif grad_A is not None:
            grad["A"], grad["B"] = _to(grad_A, A.dtype), _to(grad_B, B.dtype)
        return tuple(grad[k] for k in INPUTS)


def bias_dominates(h, c, bias):
    """Whether some row's bias exceeds BIAS_DOMINATES times its mean |c * h| over tokens (then y - b would lose c * h's
    digits, and h is kept instead of y)."""
    if bias is None:
        return False
    tokens = max(1, h.numel() // h.shape[-1])
    mean_h = torch.linalg.vector_norm(h.reshape(-1, h.shape[-1]), ord=1, dim=0) / tokens  # (out,)
    return bool((_to(bias, c.dtype).abs() > BIAS_DOMINATES * c.abs() * _to(mean_h, c.dtype)).any())


def gradient_of_c(G2, kept, bias, c, keep_h):
    """dL/dc = sum over tokens of G * h (out,), from h itself, or from the kept output y: sum_t G * (y - b) / c.
    Where c == 0 (D2-LoRA's t_i = 0) the y form is not used: that gradient is multiplied by dc/dnorm = 0."""
    Gf = _to(G2, c.dtype)  # (N, out)
    g = (Gf * _to(kept, c.dtype).reshape(Gf.shape)).sum(0)  # sum_t G * h, or sum_t G * y: (out,)
    if keep_h:
        return g
    if bias is not None:
        g = g - _to(bias, c.dtype) * Gf.sum(0)  # sum_t G * (y - b) = c * sum_t G * h
    return g / c.masked_fill(c == 0, 1)


def through_the_norm(g_c, c, norm, W0, A, B, VA, s):
    """The part of dL/dA and dL/dB that flows through norm(V) (an attached norm), in the norms' dtype:
    dL/dV_i = k_i * V_i with k_i = -dL/dc_i * c_i / norm(V_i)^2 (0 where norm(V_i) < eps: past the clamp the norm is
    constant), so dL/dB += s * k * (V @ A.T) and dL/dA += s * (k * B).T @ V, the latter from the factors:
    (k B).T @ V = (k B).T @ W0 + s * ((k B).T @ B) @ A. VA = V @ A.T was kept from forward."""
    ndt = c.dtype
    s_k = (
        (g_c * c).div_(norm.clamp_min(NORM_EPS).square()).mul_(-s).masked_fill_(norm < NORM_EPS, 0)[:, None]
    )  # (out, 1)
    A_n, B_n, W0_n = _to(A, ndt), _to(B, ndt), _to(W0, ndt)
    s_kB_t = (B_n * s_k).t()  # (s k B).T: (k, out)
    d_A = torch.addmm(torch.mm(s_kB_t, W0_n), torch.mm(s_kB_t, B_n), A_n, alpha=s)  # s * (k B).T @ V: (k, in)
    return d_A, VA * s_k  # (k, in), (out, k)


def row_scaled_low_rank(layer, x, A, B, target, detach_norm, keep_h=False, readd=False, negative=(None, None, None)):
    """Run RowScaledLowRank for an adapter layer: picks the compute dtype (the autocast dtype when autocast
    is on, else x's), applies the layer's dropout to the low-rank branch's input, and turns autocast off
    inside (the function casts for itself)."""
    if x.shape[-1] != layer.in_features:  # else a reshape would fail with a message about sizes, not features
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the layer takes {layer.in_features}")
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        x = x.to(torch.get_autocast_dtype(device))
    xd = None if isinstance(layer.lora_dropout, torch.nn.Identity) else layer.lora_dropout(x)
    grad = torch.is_grad_enabled()
    settings = Settings(s=layer.scaling, detach_norm=detach_norm, readd=readd, keep_h=keep_h or readd, grad=grad)
    args = (x, xd, layer.base.weight, layer.base.bias, A, B, target, *negative, settings)
    if not autocast:
        return RowScaledLowRank.apply(*args)
    with torch.autocast(device, enabled=False):
        return RowScaledLowRank.apply(*args)


def base_is_frozen(layer):
    """The hand-written backward has no gradient for W0 or the bias: a layer whose base was unfrozen runs the plain
    forward() instead."""
    return not any(p.requires_grad for p in layer.base.parameters())


class FusedDoRALinear(DoRALinear):
    """DoRALinear whose forward() is RowScaledLowRank (set_fused swaps it in): the same math and parameters."""

    def forward(self, x):
        if not base_is_frozen(self):
            return super().forward(x)
        # a magnitude of exactly 0 keeps h for its gradient (see the module docstring)
        keep_h = self.magnitude.requires_grad and torch.is_grad_enabled() and bool((self.magnitude == 0).any())
        return row_scaled_low_rank(self, x, self.lora_A, self.lora_B, self.magnitude, self.detach_norm, keep_h)


class FusedD2LoRALinear(D2LoRALinear):
    """D2LoRALinear whose forward() (with the projection) is RowScaledLowRank; the paper's form when readd_delta."""

    def forward(self, x):
        if not self.project or not base_is_frozen(self):
            return super().forward(x)
        negative = (self.lora_A_neg, self.lora_B_neg, self.tau)  # stacked inside: B = [B_pos, -tau * B_neg]
        pos = (self.lora_A_pos, self.lora_B_pos)
        return row_scaled_low_rank(
            self, x, *pos, self.target_norm, self.detach_norm, readd=self.readd_delta, negative=negative
        )


FUSED = {DoRALinear: FusedDoRALinear, D2LoRALinear: FusedD2LoRALinear}  # plain class -> its fused subclass


def set_fused(model, enabled=True):
    """Run the fused (True) or the plain (False, the default) implementation in every DoRA and D2-LoRA layer of `model`
    (a model or one layer; LoRA has only the plain one): each such layer's class becomes its fused subclass, or its
    plain class again. Parameters, buffers and options stay as they are. Returns the model."""
    enabled = check_bool("enabled", enabled)  # the string "false" must not switch the fused path on
    plain_of = {fused: plain for plain, fused in FUSED.items()}
    for m in model.modules():
        plain = plain_of.get(type(m), type(m))
        if plain in FUSED:
            m.__class__ = FUSED[plain] if enabled else plain
    return model


def is_fused(layer):
    """Whether `layer` runs the fused path (set_fused)."""
    return type(layer) in FUSED.values()
