"""NumPy-only reference of the math in docs/DESIGN.md ("The math"): what a port of LoRA, DoRA or D2-LoRA must compute.

No torch here: forward pass (with an optional dropout mask), merged weight, row norms, trainable-parameter counts,
and the gradients of the scalar loss L = sum(y * G) for a given upstream gradient G = dL/dy, written out by hand
(this is where `detach_norm` and dropout show). The tests check the torch layers against these functions, and
tests/golden/ holds the torch layers' outputs for fixed inputs, checked against these before they are written.

Conventions (PyTorch's): W0 is (out, in); y = x @ W.T + b; row norms run over `in` (axis 1), one per
output row; A = lora_A is (r, in), B = lora_B is (out, r); s = alpha / r.

Parameter dicts use the torch attribute names:
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


def delta_weight(method, params, alpha):
    """The low-rank residual before any normalisation, (out, in)."""
    _check_method(method)
    if method in ("lora", "dora"):
        A, B = params["lora_A"], params["lora_B"]
        return scaling(alpha, A.shape[0]) * B @ A
    r = params["lora_A_pos"].shape[0]
    pos = params["lora_B_pos"] @ params["lora_A_pos"]  # (out, in)
    neg = params["lora_B_neg"] @ params["lora_A_neg"]  # (out, in)
    return scaling(alpha, r) * (pos - params["tau"] * neg)


def row_factor(method, V, W0, params, project=True):
    """The per-row factor c with W = c[:, None] * V: ones for LoRA (and D2-LoRA without projection),
    magnitude / norm(V) for DoRA, norm(W0) / norm(V) for D2-LoRA."""
    if method == "lora" or (method == "d2lora" and not project):
        return np.ones(V.shape[0], dtype=V.dtype)
    target = params["magnitude"] if method == "dora" else row_norm(W0)  # D2-LoRA: fixed when wrapped
    return target / np.maximum(row_norm(V), NORM_EPS)


def merged_weight(method, W0, params, alpha, project=True):
    """The (out, in) weight the adapted layer applies (in eval mode)."""
    V = W0 + delta_weight(method, params, alpha)
    return row_factor(method, V, W0, params, project)[:, None] * V


def _stacked(method, params):
    """(A, B) with B @ A the low-rank product: D2-LoRA's two branches as one rank-2r pair."""
    if method in ("lora", "dora"):
        return params["lora_A"], params["lora_B"]
    A = np.concatenate([params["lora_A_pos"], params["lora_A_neg"]])  # (2r, in)
    B = np.concatenate([params["lora_B_pos"], -params["tau"] * params["lora_B_neg"]], axis=1)  # (out, 2r)
    return A, B


def _dropped(x, mask, p):
    """dropout(x) with a given keep-mask (1 = kept): kept entries are scaled by 1 / (1 - p)."""
    return x if mask is None else x * mask / (1.0 - p)


def forward(method, x, W0, bias, params, alpha, project=True, mask=None, p=0.0):
    """y = c * (x @ W0.T + s * (dropout(x) @ A.T) @ B.T) + b for x of shape (..., in) -> (..., out).

    mask (same shape as x, 1 = kept) and p describe a training-mode dropout on the low-rank branch's input;
    without them (eval mode, or no dropout) y = x @ merged_weight().T + b.
    """
    _check_method(method)
    A, B = _stacked(method, params)
    s = scaling(alpha, params["lora_A" if method != "d2lora" else "lora_A_pos"].shape[0])
    V = W0 + s * B @ A
    c = row_factor(method, V, W0, params, project)
    h = x @ W0.T + s * (_dropped(x, mask, p) @ A.T) @ B.T
    y = c * h
    return y if bias is None else y + bias


def trainable_parameter_count(method, in_features, out_features, r, learn_tau=True):
    _check_method(method)
    lora = r * (in_features + out_features)
    if method == "lora":
        return lora
    if method == "dora":
        return lora + out_features
    return 2 * lora + (1 if learn_tau else 0)


def gradients(method, x, W0, bias, params, alpha, grad_output, project=True, detach_norm=None, mask=None, p=0.0):
    """dL/d(every adapter tensor) and dL/dx for L = sum(forward(...) * grad_output).

    detach_norm defaults to each method's default (DoRA True, D2-LoRA False). With h = x @ W0.T + s z @ B.T,
    z = dropout(x) @ A.T, y = c * h + b and c = t / max(norm(V), eps) (t = magnitude or norm(W0)); G = dL/dy:
        dL/dh = G * c;   dL/dc_i = sum over tokens of G_i * h_i
        dL/dB = s * dL/dh.T @ z;   dL/dA = s * (dL/dh @ B).T @ dropout(x)     (the low-rank branch's own input)
        dL/dx = dL/dh @ W0 + (s * (dL/dh @ B) @ A) * mask / (1 - p)          (W0 sees x, the branch dropout(x))
        DoRA's magnitude:  dL/dm_i = dL/dc_i / max(norm(V_i), eps)
        attached norm:     dL/dV_i = k_i V_i,  k_i = -dL/dc_i * c_i / norm(V_i)^2   (0 where norm(V_i) < eps)
                           dL/dB += s * dL/dV @ A.T;   dL/dA += s * B.T @ dL/dV
    Without dropout dL/dV = c * Gw - ... with Gw = G.T @ x is the same thing (docs/PORTING.md, section 5).
    """
    _check_method(method)
    if detach_norm is None:
        detach_norm = method == "dora"
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    xd2 = _dropped(x, mask, p).reshape(x2.shape)  # (N, in)
    keep = None if mask is None else mask.reshape(x2.shape) / (1.0 - p)
    G = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
    A, B = _stacked(method, params)
    r = A.shape[0] if method != "d2lora" else A.shape[0] // 2
    s = scaling(alpha, r)
    V = W0 + s * B @ A  # (out, in)
    c = row_factor(method, V, W0, params, project)  # (out,)
    z = xd2 @ A.T  # (N, k)
    h = x2 @ W0.T + s * z @ B.T  # (N, out)
    Gh = G * c  # dL/dh
    GhB = Gh @ B  # (N, k)
    gx = Gh @ W0 + s * (GhB @ A) * (1.0 if keep is None else keep)
    grads = {"x": gx.reshape(x.shape)}
    dB = s * Gh.T @ z  # (out, k)
    dA = s * GhB.T @ xd2  # (k, in)
    scaled = method == "dora" or (method == "d2lora" and project)
    if scaled:
        norm = row_norm(V)
        clamped = np.maximum(norm, NORM_EPS)
        gc = np.sum(G * h, axis=0)  # dL/dc: (out,)
        if method == "dora":
            grads["magnitude"] = gc / clamped
        if not detach_norm:
            k = np.where(norm >= NORM_EPS, -gc * c / clamped**2, 0.0)  # (out,)
            dV = k[:, None] * V  # (out, in)
            dB = dB + s * dV @ A.T
            dA = dA + s * B.T @ dV
    if method in ("lora", "dora"):
        grads["lora_A"], grads["lora_B"] = dA, dB
    else:  # back to the two branches: B = [B_pos, -tau * B_neg]
        grads["lora_A_pos"], grads["lora_A_neg"] = dA[:r], dA[r:]
        grads["lora_B_pos"], grads["lora_B_neg"] = dB[:, :r], -params["tau"] * dB[:, r:]
        grads["tau"] = np.asarray(-np.sum(dB[:, r:] * params["lora_B_neg"]))
    return grads
