"""NumPy-only reference of the math in docs/PORTING.md: what a port of LoRA, DoRA or D2-LoRA must compute.

No torch here: forward pass (with an optional dropout mask), merged weight, row norms, trainable-parameter counts,
and the gradients of the scalar loss L = sum(y * G) for a given upstream gradient G = dL/dy, written out by hand
(this is where `detach_norm`, dropout, the eps rule and a learned tau show). The tests check the torch layers
against these functions, and tests/golden/ holds the torch layers' outputs for fixed inputs, checked against
these before they are written.

Conventions (PyTorch's): W0 is (out, in); y = x @ W.T + b; row norms run over `in` (axis 1), one per
output row; A = lora_A is (r, in), B = lora_B is (out, r); s = alpha / r.

The weight each method applies (V = W0 + dW, c the per-row factor):
    lora:    W = W0 + dW,           dW = s * B @ A
    dora:    W = c[:, None] * V,    c = magnitude / max(norm(V), eps)
    d2lora:  dW = s * (B_pos @ A_pos - tau * B_neg @ A_neg),  c = t / max(norm(V), eps),  t = norm(W0),
             P(V) = c[:, None] * V, and
               W = P(V) + dW   the paper's form (project=True, readd_delta=True: the default)
               W = P(V)        the exact-norm form (readd_delta=False)
               W = V           without the projection (project=False; readd_delta changes nothing)

Parameter dicts use the torch attribute names (tau is always there for d2lora, learned or fixed):
    lora:   lora_A, lora_B
    dora:   lora_A, lora_B, magnitude
    d2lora: lora_A_pos, lora_B_pos, lora_A_neg, lora_B_neg, tau
"""

import numpy as np

NORM_EPS = 1e-12  # row norms are clamped to at least this before dividing (a zero row stays zero)


def row_norm(W):
    """L2 norm of each output row of an (out, in) matrix, over in -> (out,)."""
    return np.sqrt(np.sum(W * W, axis=1))


def scaling(alpha, r):
    return alpha / r


def _check_method(method):
    if method not in ("lora", "dora", "d2lora"):
        raise ValueError(f"unknown method {method!r}; valid: lora, dora, d2lora")


def _rank(method, params):
    """r: the rank of one branch (D2-LoRA's two branches share it and s = alpha / r)."""
    return params["lora_A_pos" if method == "d2lora" else "lora_A"].shape[0]


def _stacked(method, params):
    """(A, B) with s * B @ A = dW: D2-LoRA's two branches as one rank-2r pair."""
    if method in ("lora", "dora"):
        return params["lora_A"], params["lora_B"]  # (r, in), (out, r)
    A = np.concatenate([params["lora_A_pos"], params["lora_A_neg"]])  # (2r, in)
    B = np.concatenate([params["lora_B_pos"], -params["tau"] * params["lora_B_neg"]], axis=1)  # (out, 2r)
    return A, B


def _projects(method, project):
    """Whether W is c[:, None] * V with a norm-based c (DoRA always, D2-LoRA unless project=False)."""
    return method == "dora" or (method == "d2lora" and project)


def _readds(method, project, readd_delta):
    """Whether dW is added once more after the projection (D2-LoRA's paper form)."""
    return method == "d2lora" and project and readd_delta


def delta_weight(method, params, alpha):
    """The low-rank residual dW before any normalisation, (out, in)."""
    _check_method(method)
    A, B = _stacked(method, params)  # (k, in), (out, k)
    return scaling(alpha, _rank(method, params)) * B @ A  # (out, in)


def row_factor(method, V, W0, params, project=True):
    """The per-row factor c of the projection (out,): ones for LoRA (and D2-LoRA without projection),
    magnitude / max(norm(V), eps) for DoRA, norm(W0) / max(norm(V), eps) for D2-LoRA."""
    if not _projects(method, project):
        return np.ones(V.shape[0], dtype=V.dtype)
    target = params["magnitude"] if method == "dora" else row_norm(W0)  # D2-LoRA: t, fixed when wrapped
    return target / np.maximum(row_norm(V), NORM_EPS)


def merged_weight(method, W0, params, alpha, project=True, readd_delta=True):
    """The (out, in) weight the adapted layer applies in eval mode (what merge() produces)."""
    dW = delta_weight(method, params, alpha)  # (out, in)
    V = W0 + dW  # (out, in)
    W = row_factor(method, V, W0, params, project)[:, None] * V  # P(V), or V itself for LoRA: (out, in)
    return W + dW if _readds(method, project, readd_delta) else W


def _dropped(x, mask, p):
    """dropout(x) with a given keep-mask (1 = kept): kept entries are scaled by 1 / (1 - p)."""
    return x if mask is None else x * mask / (1.0 - p)


def forward(method, x, W0, bias, params, alpha, project=True, readd_delta=True, mask=None, p=0.0):
    """y for x of shape (..., in) -> (..., out), through the factors:

        low = s * (dropout(x) @ A.T) @ B.T      x @ dW.T (with dropout: on the low-rank branch's input only)
        y   = c * (x @ W0.T + low) + b          (+ low once more in D2-LoRA's paper form)

    mask (same shape as x, 1 = kept) and p describe a training-mode dropout; without them (eval mode, or no
    dropout) y = x @ merged_weight().T + b.
    """
    _check_method(method)
    A, B = _stacked(method, params)  # (k, in), (out, k)
    s = scaling(alpha, _rank(method, params))
    V = W0 + s * B @ A  # (out, in): only its row norms are used
    c = row_factor(method, V, W0, params, project)  # (out,)
    low = s * (_dropped(x, mask, p) @ A.T) @ B.T  # (..., out)
    y = c * (x @ W0.T + low)  # (..., out)
    if _readds(method, project, readd_delta):
        y = y + low  # the paper's form: x @ (P(V) + dW).T
    return y if bias is None else y + bias


def trainable_parameter_count(method, in_features, out_features, r, learn_tau=False):
    """LoRA(r): r(in + out); DoRA(r): + out; D2-LoRA(r): 2r(in + out) = LoRA(2r), + 1 with a learned tau."""
    _check_method(method)
    lora = r * (in_features + out_features)
    if method == "lora":
        return lora
    if method == "dora":
        return lora + out_features
    return 2 * lora + (1 if learn_tau else 0)


def norm_gradient_factor(grad_c, c, norm):
    """k (out,) with dL/dV_i = k_i * V_i, the gradient that reaches V through an attached norm(V):

        k_i = -dL/dc_i * c_i / norm(V_i)^2,   and k_i = 0 where norm(V_i) < eps

    (c_i = target_i / norm(V_i), so dc_i/dV_i = -c_i * V_i / norm(V_i)^2; below eps the clamp holds the norm at the
    constant eps, and a constant has no gradient)."""
    below = norm < NORM_EPS
    return np.where(below, 0.0, -grad_c * c / np.where(below, 1.0, norm) ** 2)


def gradients(
    method,
    x,
    W0,
    bias,
    params,
    alpha,
    grad_output,
    project=True,
    readd_delta=True,
    detach_norm=None,
    learn_tau=False,
    mask=None,
    p=0.0,
):
    """{"x": dL/dx, <trainable name>: dL/d<name>} for L = sum(forward(...) * grad_output).

    detach_norm defaults to each method's default (DoRA True, D2-LoRA False); tau gets a gradient only with
    learn_tau=True. Tokens flattened: x, xd = dropout(x) (N, in); G, h (N, out); z = xd @ A.T (N, k);
    h = x @ W0.T + low with low = s * z @ B.T; y = c * h + b (+ low in the paper's form):

        dL/dh   = G * c;     dL/dlow = dL/dh + G in the paper's form, else dL/dh
        dL/dz   = s * dL/dlow @ B
        dL/dB   = s * dL/dlow.T @ z;      dL/dA = dL/dz.T @ xd          (the branch's own input, xd)
        dL/dx   = dL/dh @ W0 + (dL/dz @ A) * mask / (1 - p)              (W0 sees x, the branch xd)
        dL/dc_i = sum over tokens of G_i * h_i;   DoRA's magnitude: dL/dm_i = dL/dc_i / max(norm(V_i), eps)
        attached norm: dL/dV_i = k_i * V_i (norm_gradient_factor);  dL/dB += s * dL/dV @ A.T;  dL/dA += s * B.T @ dL/dV
        D2-LoRA's branches from the stacked pair, B = [B_pos, -tau * B_neg]:
            dL/dA_pos, dL/dA_neg = first, last r rows of dL/dA;   dL/dB_pos = first r columns of dL/dB
            dL/dB_neg = -tau * (last r columns);   dL/dtau = -sum((last r columns) * B_neg)
    """
    _check_method(method)
    if detach_norm is None:
        detach_norm = method == "dora"
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    xd2 = _dropped(x, mask, p).reshape(x2.shape)  # (N, in)
    keep = 1.0 if mask is None else mask.reshape(x2.shape) / (1.0 - p)  # d xd / d x: (N, in)
    G = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
    A, B = _stacked(method, params)  # (k, in), (out, k)
    r = _rank(method, params)
    s = scaling(alpha, r)
    V = W0 + s * B @ A  # (out, in)
    c = row_factor(method, V, W0, params, project)  # (out,)
    z = xd2 @ A.T  # (N, k)
    h = x2 @ W0.T + s * z @ B.T  # (N, out)

    g_h = G * c  # dL/dh: (N, out)
    g_low = g_h + G if _readds(method, project, readd_delta) else g_h  # dL/dlow: (N, out)
    g_z = s * g_low @ B  # dL/dz: (N, k)
    grads = {"x": (g_h @ W0 + (g_z @ A) * keep).reshape(x.shape)}  # (..., in)
    dB = s * g_low.T @ z  # (out, k)
    dA = g_z.T @ xd2  # (k, in)
    if _projects(method, project):
        norm = row_norm(V)  # (out,)
        g_c = np.sum(G * h, axis=0)  # dL/dc: (out,)
        if method == "dora":
            grads["magnitude"] = g_c / np.maximum(norm, NORM_EPS)  # (out,)
        if not detach_norm:
            dV = norm_gradient_factor(g_c, c, norm)[:, None] * V  # dL/dV through norm(V): (out, in)
            dB = dB + s * dV @ A.T  # (out, k)
            dA = dA + s * B.T @ dV  # (k, in)
    if method in ("lora", "dora"):
        grads["lora_A"], grads["lora_B"] = dA, dB
        return grads
    grads["lora_A_pos"], grads["lora_A_neg"] = dA[:r], dA[r:]  # (r, in) each
    grads["lora_B_pos"] = dB[:, :r]  # (out, r)
    grads["lora_B_neg"] = -params["tau"] * dB[:, r:]  # (out, r): the stacked B holds -tau * B_neg
    if learn_tau:
        grads["tau"] = np.asarray(-np.sum(dB[:, r:] * params["lora_B_neg"]))  # scalar
    return grads
