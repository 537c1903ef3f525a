"""The fast path of DoRA and D2-LoRA: the same math as the plain forward() in dora.py and d2lora.py, as one
autograd function per layer whose backward is written out by hand. Read those files first; this one is
only an optimisation of them, and tests/test_fast.py checks outputs and every gradient against them.

Both methods compute   y = c * h + b   with   h = x @ W0.T + s * (dropout(x) @ A.T) @ B.T   (..., out)
and the per-row factor c = target / max(norm(V), eps), V = W0 + s * B @ A, target = DoRA's magnitude or
D2-LoRA's fixed norm(W0). (D2-LoRA passes its stacked factors A = [A_pos; A_neg], B = [B_pos, -tau * B_neg].)

What the fused function saves, and why it stays exact:
- Operations. Plain autograd records a dozen small operations per layer and as many backward nodes; at the
  small default shape a training step is dispatch-bound, so that count is the cost (make bench counts them).
- A weight-sized tensor. The norm needs V (out, in). The plain path keeps it for backward; here it is formed
  without gradient tracking in forward, used for its row norms and dropped. V is formed exactly as in the
  plain path, so the norms - also of rows that nearly cancel - carry the plain path's rounding, not more (the
  expansion norm(V_i)^2 = norm(W0_i)^2 + 2s<B_i, (W0 A^T)_i> + s^2 B_i A A^T B_i^T, which needs no V, loses
  digits there: it subtracts numbers of size norm(W0_i)^2 to get a small one). Backward needs V only through
  V @ A.T (out, k) and B.T @ V scaled by a vector, which the factors give: V @ A.T = W0 @ A.T + s B (A A^T).
  Their rounding error is that of V itself (eps times norm(W0_i) + norm(dW_i)), the plain path's.
- A (..., out) activation. dL/dc_i = sum over tokens of g_i * h_i needs h. Autograd would keep h; but
  y = c * h + b, so h = (y - b) / c wherever c != 0, and the layer's output y is kept by the next operation
  anyway (attention keeps q, k, v; GELU keeps its input). Where c == 0 and dL/dc is still needed (a DoRA
  magnitude of exactly 0), h is kept instead. D2-LoRA's c is 0 only where norm(W0_i) = 0, and there dL/dc
  is multiplied by dc/dnorm = -t / norm^2 = 0, so it is set to 0.
  The price: an in-place change of the layer's output before backward raises an autograd error (tested).

The backward, for G = dL/dy flattened to (N, out) and x to (N, in) (docs/PORTING.md, section 5):
    dL/dh = G * c;  dL/dx = dL/dh @ W0 (+ s * (dL/dh @ B) @ A through dropout);  z = dropout(x) @ A.T
    dL/dB = s * dL/dh.T @ z;   dL/dA = s * (dL/dh @ B).T @ dropout(x)
    dL/dc = sum_t G * h;   dL/dtarget = dL/dc / norm(V)   (DoRA's magnitude)
    attached norm only:  dL/dV_i = k_i V_i  with  k_i = -dL/dc_i * c_i / norm(V_i)^2  (0 below eps)
                         dL/dB += s * k[:, None] * (V @ A.T);   dL/dA += s * (k[:, None] * B).T @ V
                         with V @ A.T = W0 @ A.T + s * B @ (A @ A.T) and (kB).T @ V = (kB).T @ W0 + s (kB).T B A

Mixed precision: under autocast the activations' matmuls run in the autocast dtype (as nn.Linear's would) and
the output has that dtype; V, its norms and c are computed in float32 from the float32 weights.
"""

import torch

from .base import NORM_EPS, factor_as, norm_dtype


def _to(t, dtype):
    """t in dtype, without an operator call when it already is (at the small shape every call counts)."""
    return t if t.dtype == dtype else t.to(dtype)


class RowScaledLowRank(torch.autograd.Function):
    """y = c * (x @ W0.T + s * (xd @ A.T) @ B.T) + b,  c = target / max(norm(W0 + s * B @ A), eps).

    x (..., in) in the compute dtype; xd = dropout(x), or None when there is no dropout; W0 (out, in),
    bias (out,) or None, A (r, in), B (out, r), target (out,) in the weights' dtype. W0 and bias are frozen.
    D2-LoRA also passes A_neg (r, in), B_neg (out, r) and tau: then A = [A; A_neg] (2r, in) and
    B = [B, -tau * B_neg] (out, 2r), stacked here so that the stacking costs no autograd nodes.
    """

    @staticmethod
    def forward(ctx, x, xd, W0, bias, A, B, target, s, detach_norm, keep_h, A_neg=None, B_neg=None, tau=None):
        dt, ndt = x.dtype, norm_dtype(W0.dtype)
        if A_neg is not None:  # D2-LoRA's two branches as one rank-2r pair
            A, B = torch.cat([A, A_neg]), torch.cat([B, B_neg * -tau], dim=1)  # (2r, in), (out, 2r)
        lead, (n_out, n_in) = x.shape[:-1], W0.shape
        x2 = x.reshape(-1, n_in)  # (N, in)
        xd2 = x2 if xd is None else xd.reshape(-1, n_in)  # (N, in)
        z = torch.mm(xd2, _to(A, dt).t())  # (N, k)
        h = torch.addmm(torch.mm(x2, _to(W0, dt).t()), z, _to(B, dt).t(), alpha=s)  # x @ V.T, factored: (N, out)
        V = torch.addmm(_to(W0, ndt), _to(B, ndt), _to(A, ndt), alpha=s)  # (out, in), dropped after its norms
        norm = torch.linalg.vector_norm(V, dim=1)  # L2 over in_features -> (out,)
        c = _to(target, ndt) / norm.clamp_min(NORM_EPS)  # (out,)
        cd = factor_as(c, dt)
        h3 = h.view(*lead, n_out)  # (..., out); y must be a new tensor, not a view, so that it can be saved
        y = h3 * cd if bias is None else torch.addcmul(_to(bias, dt), h3, cd)  # (..., out)

        needs = ctx.needs_input_grad  # x, xd, W0, bias, A, B, target, s, detach_norm, keep_h, A_neg, B_neg, tau
        need_AB = any(needs[i] for i in (4, 5, 10, 11, 12))  # does any factor (or tau) want a gradient?
        need_gc = needs[6] or (not detach_norm and need_AB)  # is dL/dc needed?
        kept = (h if keep_h else y) if need_gc else None  # h itself, or y to recover it from
        ctx.save_for_backward(x2, None if xd is None else xd2, z, W0, bias, A, B, target, c, norm, kept, B_neg, tau)
        ctx.s, ctx.detach_norm, ctx.keep_h, ctx.need_gc, ctx.x_shape = s, detach_norm, keep_h, need_gc, x.shape
        ctx.need_AB, ctx.stacked = need_AB, A_neg is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, xd2, z, W0, bias, A, B, target, c, norm, kept, B_neg, tau = ctx.saved_tensors
        s, needs = ctx.s, ctx.needs_input_grad
        dt, ndt = x2.dtype, c.dtype
        g2 = g.reshape(-1, W0.shape[0])  # (N, out)
        gh = g2 * factor_as(c, dt)  # dL/dh: (N, out)
        Ad = _to(A, dt)
        gz = torch.mm(gh, _to(B, dt)).mul_(s)  # dL/dz: (N, k)
        grad_x = grad_xd = grad_A = grad_B = grad_target = None
        if needs[0]:
            grad_x = torch.mm(gh, _to(W0, dt))  # (N, in)
            if xd2 is None:  # no dropout: the low-rank branch saw x itself
                grad_x.addmm_(gz, Ad)
            grad_x = grad_x.view(ctx.x_shape)
        if needs[1]:
            grad_xd = torch.mm(gz, Ad).view(ctx.x_shape)  # (..., in)
        if ctx.need_AB:
            grad_A = _to(torch.mm(gz.t(), x2 if xd2 is None else xd2), ndt)  # (k, in)
            grad_B = _to(torch.mm(gh.t(), z).mul_(s), ndt)  # (out, k)
        if ctx.need_gc:
            gf = _to(g2, ndt)
            if ctx.keep_h:
                gc = (gf * _to(kept, ndt)).sum(0)  # sum_t g * h: (out,)
            else:
                gy = (gf * _to(kept, ndt).view(gf.shape)).sum(0)  # sum_t g * y
                if bias is not None:
                    gy -= _to(bias, ndt) * gf.sum(0)  # sum_t g * (y - b) = c * sum_t g * h
                gc = gy / c.masked_fill(c == 0, 1)  # sum_t g * h: (out,); where c == 0 it is not used (see above)
            clamped = norm.clamp_min(NORM_EPS)
            if needs[6]:
                grad_target = _to(gc / clamped, target.dtype)  # dc/dtarget = 1 / norm
            if not ctx.detach_norm and ctx.need_AB:
                k = (gc * c).div_(clamped.square()).neg_()  # dL/dV_i = k_i V_i: (out,)
                k.masked_fill_(norm < NORM_EPS, 0)  # below eps the clamp holds the norm constant
                An, Bn, Wn = _to(A, ndt), _to(B, ndt), _to(W0, ndt)
                ks = k.mul_(s)
                # s * dL/dV @ A.T with V @ A.T = W0 @ A.T + s * B @ (A @ A.T): no (out, in) tensor formed
                VA = torch.addmm(torch.mm(Wn, An.t()), Bn, torch.mm(An, An.t()), alpha=s)  # (out, k)
                grad_B += VA.mul_(ks[:, None])  # (out, k)
                # s * B.T @ dL/dV = (k * s * B).T @ (W0 + s * B @ A)
                Bk = (Bn * ks[:, None]).t()  # (k, out)
                grad_A += torch.addmm(torch.mm(Bk, Wn), torch.mm(Bk, Bn), An, alpha=s)  # (k, in)
        grad_A_neg = grad_B_neg = grad_tau = None
        if ctx.need_AB and ctx.stacked:  # back to the two branches: B = [B_pos, -tau * B_neg]
            r = B_neg.shape[1]
            grad_A, grad_A_neg = grad_A[:r], grad_A[r:]  # (r, in) each
            grad_B, g_neg = grad_B[:, :r], grad_B[:, r:]  # (out, r) each; g_neg = dL/d(-tau * B_neg)
            grad_B_neg = _to(g_neg * -tau, B_neg.dtype)
            grad_tau = _to(-(g_neg * B_neg).sum(), tau.dtype)
            grad_A_neg = _to(grad_A_neg, A.dtype)
        if grad_A is not None:
            grad_A, grad_B = _to(grad_A, A.dtype), _to(grad_B, B.dtype)
        return grad_x, grad_xd, None, None, grad_A, grad_B, grad_target, None, None, None, grad_A_neg, grad_B_neg, grad_tau


def row_scaled_low_rank(layer, x, A, B, target, detach_norm, keep_h=False, negative=()):
    """Run RowScaledLowRank for an adapter layer: picks the compute dtype (the autocast dtype when autocast
    is on, else x's), applies the layer's dropout to the low-rank branch's input, and turns autocast off
    inside (the function casts for itself)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        x = x.to(torch.get_autocast_dtype(device))
    xd = None if isinstance(layer.lora_dropout, torch.nn.Identity) else layer.lora_dropout(x)
    args = (x, xd, layer.base.weight, layer.base.bias, A, B, target, layer.scaling, detach_norm, keep_h, *negative)
    if not autocast:
        return RowScaledLowRank.apply(*args)
    with torch.autocast(device, enabled=False):
        return RowScaledLowRank.apply(*args)


def applies(layer):
    """Whether `layer` runs the fast path: its `fast` flag is on and its base is frozen (the hand-written
    backward has no gradient for W0 or the bias; someone who unfreezes them gets the plain path)."""
    return layer.fast and not any(p.requires_grad for p in layer.base.parameters())


def dora_forward(layer, x):
    """DoRALinear.forward, fused. A magnitude of exactly 0 keeps h for its gradient (see the module docstring)."""
    keep_h = layer.magnitude.requires_grad and torch.is_grad_enabled() and bool((layer.magnitude == 0).any())
    return row_scaled_low_rank(layer, x, layer.lora_A, layer.lora_B, layer.magnitude, layer.detach_norm, keep_h)


def d2lora_forward(layer, x):
    """D2LoRALinear.forward (with the projection), fused."""
    negative = (layer.lora_A_neg, layer.lora_B_neg, layer.tau)  # stacked inside: B = [B_pos, -tau * B_neg]
    return row_scaled_low_rank(layer, x, layer.lora_A_pos, layer.lora_B_pos, layer.target_norm, layer.detach_norm,
                               negative=negative)  # fmt: skip


def set_fast_path(model, enabled):
    """Select the fused (True) or the plain (False) implementation in every adapter layer of `model`."""
    from .base import AdapterLinear

    for m in model.modules():
        if isinstance(m, AdapterLinear):
            m.fast = bool(enabled)
    return model
