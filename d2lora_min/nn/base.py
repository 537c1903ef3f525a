"""What every adapter shares: wrapping and freezing a base nn.Linear, the scaling s = alpha / r,
the initialisation of the low-rank factors, and merging into a plain nn.Linear.

Each method (lora.py, dora.py, d2lora.py) subclasses AdapterLinear and writes out its own
`delta_weight()`, `merged_weight()` and `forward()`, so that its math reads top to bottom in one file.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Guard for dividing by a row norm: a zero row of W0 must give a zero row, never NaN.
NORM_EPS = 1e-12


def row_norm(weight):
    """L2 norm of each output row of an (out, in) weight, over in_features -> (out,).

    Papers that store weights as (in, out) call the same quantity a column norm.
    """
    return torch.linalg.vector_norm(weight, dim=1)


def row_scale(target, v_norm, detach_norm):
    """c = target / norm(V), the factor that gives row i of c[:, None] * V the norm target[i] -> (out,).

    v_norm = norm(V) (out,). detach_norm=True treats it as a constant in backward. The clamp keeps a zero
    row at zero instead of NaN.
    """
    if detach_norm:
        v_norm = v_norm.detach()
    return target / v_norm.clamp_min(NORM_EPS)  # (out,)


class _ScaleRows(torch.autograd.Function):
    """y = c * h + b, for h (..., out), c (out,) and an optional bias b (out,), saving y instead of h.

    Plain autograd would keep h, a second (..., out) tensor per layer, to compute dL/dc = sum over tokens of
    g * h. Its output y is usually kept by the next operation anyway (attention keeps q, k, v; GELU keeps
    its input), and h = (y - b) / c, so
        dL/dh = g * c,    dL/dc = (sum_t g * y - b * sum_t g) / c.
    Exact wherever c != 0. D2-LoRA's c is 0 only where the pretrained row is zero (t = 0), and there dL/dc is
    multiplied by dc/dnorm = -t / norm^2 = 0, so 0 is returned for it. Measured by make bench: this saves
    most of the activation memory the per-row factor would cost.
    Because y is saved, an in-place operation on the layer's output makes backward raise an error.
    """

    @staticmethod
    def forward(ctx, h, c, b):
        y = h * c if b is None else torch.addcmul(b, h, c)  # (..., out)
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, c, b)  # y only serves dL/dc
        ctx.h_dtype = h.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        y, c, b = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (tokens, out)
        grad_h = grad_c = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = (g * c).to(ctx.h_dtype)  # (..., out)
        if ctx.needs_input_grad[1]:
            gy = (g2 * y.reshape(-1, y.shape[-1])).sum(dim=0)  # sum_t g * y: (out,)
            if b is not None:
                gy = gy - b * g2.sum(dim=0)  # sum_t g * (y - b) = sum_t g * c * h
            grad_c = torch.where(c != 0, gy / torch.where(c != 0, c, 1), 0).to(c.dtype)  # sum_t g * h: (out,)
        if b is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(dim=0)  # (out,)
        return grad_h, grad_c, grad_b


def scale_rows(h, c, bias=None):
    """y = c * h + bias with c (out,) scaling the output features of h (..., out); see _ScaleRows."""
    return _ScaleRows.apply(h, c, bias)


class AdapterLinear(nn.Module):
    """Base class: holds the frozen `base` nn.Linear and the hyper-parameters common to all methods.

    Subclasses set OPTIONS (their extra constructor arguments with defaults) and implement
    delta_weight(), merged_weight(), forward() and, when they have options, options().
    """

    OPTIONS = {}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank r must be an integer >= 1, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in self.base.parameters():  # the pretrained layer is frozen: only adapters train
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r  # s: keeps the update's size comparable across ranks (LoRA, sec. 4.1)
        # Dropout acts on the input of the low-rank branch only, as in LoRA.
        self.dropout = dropout
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # --- factor initialisation (LoRA, sec. 4.1) --------------------------------------------------

    def _new_lora_A(self):
        """Down-projection (r, in), initialised like nn.Linear's weight: U(-1/sqrt(in), 1/sqrt(in))."""
        w = self.base.weight
        A = torch.empty(self.r, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # same bound nn.Linear uses: 1/sqrt(in)
        return nn.Parameter(A)

    def _new_lora_B(self):
        """Up-projection (out, r), zeros: the adapter starts as the identity on the base layer."""
        w = self.base.weight
        return nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))

    def _low_rank(self, x, lora_A, lora_B):
        """The low-rank branch through its factors: s * (dropout(x) @ A.T) @ B.T, never an (out, in) matrix.

        x: (..., in), lora_A: (k, in), lora_B: (out, k) -> (..., out)
        """
        z = F.linear(self.lora_dropout(x), lora_A)  # (..., k)
        return self.scaling * F.linear(z, lora_B)  # (..., out)

    # --- what every method provides ----------------------------------------------------------------

    def delta_weight(self):
        """The low-rank residual before any normalisation, (out, in)."""
        raise NotImplementedError

    def merged_weight(self):
        """The (out, in) weight that forward() applies: forward(x) == x @ merged_weight().T + bias."""
        raise NotImplementedError

    def options(self):
        """The method's options as constructor keyword arguments (saved with adapter checkpoints)."""
        return {}

    @torch.no_grad()
    def merge(self):
        """A plain nn.Linear with merged_weight() and the base bias: no adapter cost left at inference."""
        base = self.base
        merged = nn.Linear(
            self.in_features,
            self.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        merged.weight.copy_(self.merged_weight())
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)  # frozen, like the base layer it replaces
        return merged

    def extra_repr(self):
        opts = "".join(f", {k}={v}" for k, v in self.options().items())
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}{opts}"
