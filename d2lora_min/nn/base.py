"""What every adapter shares: wrapping and freezing a base nn.Linear, the scaling s = alpha / r, the
initialisation of the low-rank factors, row norms in a safe dtype, and merging into a plain nn.Linear.

Each method (lora.py, dora.py, d2lora.py) subclasses AdapterLinear and writes out its own
`delta_weight()`, `merged_weight()` and `forward()`, so that its math reads top to bottom in one file.
"""

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

# Guard for dividing by a row norm: a zero row of W0 must give a zero row, never NaN. Norms are always
# taken in float32 or float64 (see norm_dtype), where 1e-12 is representable; in float16 it would be 0.
NORM_EPS = 1e-12


def norm_dtype(dtype):
    """The dtype row norms and per-row factors are computed in: float32 for float16/bfloat16 weights (a
    float16 sum of squares overflows above 65504 and underflows below 6e-8), the weight's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def row_norm(weight):
    """L2 norm of each output row of an (out, in) weight, over in_features -> (out,), in norm_dtype.

    Papers that store weights as (in, out) call the same quantity a column norm.
    """
    return torch.linalg.vector_norm(weight.to(norm_dtype(weight.dtype)), dim=1)


def row_factor(target, V, detach_norm):
    """c = target / norm(V) -> (out,), in norm_dtype: the factor that gives row i of c[:, None] * V the norm |target[i]|.

    detach_norm=True treats norm(V) as a constant in backward; it is then taken without recording it for autograd, so
    nothing (out, in)-sized is kept for a backward that will not use it. The clamp keeps a zero row at zero instead of
    NaN (and its gradient is 0 below NORM_EPS).
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_norm):
        v_norm = row_norm(V)  # L2 over in_features -> (out,)
    return target.to(v_norm.dtype) / v_norm.clamp_min(NORM_EPS)  # (out,)


def factor_as(c, dtype):
    """The per-row factor c in the activations' dtype. In float16 a factor above 65504 (a row of V that is
    exactly zero, where the clamp divides by eps) would become inf, and inf * 0 is NaN: clamp it to the largest
    finite value instead, so that such a row stays zero."""
    if c.dtype == dtype:
        return c
    big = torch.finfo(dtype).max
    return c.clamp(-big, big).to(dtype)


def rescale_add(h, c, low):
    """c * h + low for h, low (..., out) and the per-row factor c (out,), in one pass (torch.addcmul), returned in h's
    dtype (what nn.Linear returns, also under autocast, where h is bfloat16 and c is float32).

    For float16 and bfloat16 activations c stays in float32 (norm_dtype), so the sum is formed in float32 and rounded
    once. During fine-tuning c sits close to 1 (1 - c about 1e-3), and bfloat16 spaces its numbers near 1 by 2^-8:
    rounding c, or c * h, to bfloat16 first would drop the rescale from every output of the row alike.
    """
    return torch.addcmul(low, h, c).to(h.dtype)  # (..., out)


def check_bool(name, value):
    """A real bool (or 0/1): the string "false" must not count as True."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_real(name, value, positive=False):
    """A finite real number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


class AdapterLinear(nn.Module):
    """Base class: holds the frozen `base` nn.Linear and the hyper-parameters common to all methods.

    Subclasses set OPTIONS (their extra constructor arguments with defaults) and implement
    delta_weight(), merged_weight() and forward(). forward() is the plain math, written out in each method's
    file, and it is what runs. DoRA and D2-LoRA also have an opt-in fused implementation: fused.py's subclasses,
    which set_fused(model, True) swaps in (the same math as one autograd function, less activation memory).
    """

    OPTIONS = {}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"rank r must be an integer >= 1, got {r!r}")
        alpha = check_real("alpha", alpha, positive=True)
        dropout = check_real("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not base.weight.is_floating_point():
            raise TypeError(f"the base weight must be floating point, got {base.weight.dtype}")
        self.base = base
        for p in self.base.parameters():  # the pretrained layer is frozen: only adapters train
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = int(r)
        self.alpha = alpha
        self.scaling = alpha / self.r  # s: keeps the update's size comparable across ranks (LoRA, sec. 4.1)
        # Dropout acts on the input of the low-rank branch only, as in LoRA.
        self.dropout = dropout
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # --- factor initialisation (LoRA, sec. 4.1) --------------------------------------------------

    def _new_lora_A(self):
        """Down-projection (r, in), initialised like nn.Linear's weight: U(-1/sqrt(in), 1/sqrt(in))."""
        w = self.base.weight
        A = torch.empty(self.r, self.in_features, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # same bound nn.Linear uses: 1/sqrt(in)
        return nn.Parameter(A.to(w.dtype))  # drawn in float32 so every dtype gets the same values

    def _new_lora_B(self):
        """Up-projection (out, r), zeros: the adapter starts as the identity on the base layer."""
        w = self.base.weight
        return nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))

    def _low_rank(self, x, lora_A, lora_B):
        """The low-rank branch through its factors: (dropout(x) @ A.T) @ (s * B).T, never an (out, in) matrix.

        x: (..., in), lora_A: (k, in), lora_B: (out, k) -> (..., out). The scaling s goes on the (out, k) factor,
        not on the (..., out) activations, which would cost a pass over them.
        """
        z = F.linear(self.lora_dropout(x), lora_A)  # (..., k)
        return F.linear(z, self.scaling * lora_B)  # (..., out)

    # --- what every method provides ----------------------------------------------------------------

    def delta_weight(self):
        """The low-rank residual before any normalisation, (out, in)."""
        raise NotImplementedError

    def merged_weight(self):
        """The (out, in) weight that forward() applies: forward(x) == x @ merged_weight().T + bias."""
        raise NotImplementedError

    def derived_buffers(self):
        """{name: tensor} of the buffers computed when the layer is wrapped, from the base weight or the options, and
        never trained (D2-LoRA's target_norm, and its tau when fixed). A loaded adapter file must agree with them, and
        they keep the values computed here."""
        return {}

    def options(self):
        """The method's options as constructor keyword arguments (saved with adapter checkpoints)."""
        return {name: getattr(self, name) for name in self.OPTIONS}

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
