"""NumPy-only reference of the math in DESIGN.md section 2: what a port of LoRA, DoRA or D2-LoRA must compute.

No torch here: forward pass, merged weight, row norms, trainable-parameter counts, and the gradients of
the scalar loss L = sum(y * G) for a given upstream gradient G = dL/dy, written out by hand (this is where
`detach_norm` shows). The tests check the torch layers against these functions and tests/golden/ holds
their outputs for fixed inputs.

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
    """The (out, in) weight the adapted layer applies."""
    V = W0 + delta_weight(method, params, alpha)
    return row_factor(method, V, W0, params, project)[:, None] * V


def forward(method, x, W0, bias, params, alpha, project=True):
    """y = x @ W.T + b for x of shape (..., in) -> (..., out)."""
    y = x @ merged_weight(method, W0, params, alpha, project).T
    return y if bias is None else y + bias


def trainable_parameter_count(method, in_features, out_features, r, learn_tau=True):
    _check_method(method)
    lora = r * (in_features + out_features)
    if method == "lora":
        return lora
    if method == "dora":
        return lora + out_features
    return 2 * lora + (1 if learn_tau else 0)


def gradients(method, x, W0, bias, params, alpha, grad_output, project=True, detach_norm=None):
    """dL/d(every adapter tensor) and dL/dx for L = sum(forward(...) * grad_output).

    detach_norm defaults to each method's default (DoRA True, D2-LoRA False). With W = c[:, None] * V and
    c = t / norm(V) (t = magnitude or norm(W0)), writing Gw = dL/dW:
        detached norm:  dL/dV = c[:, None] * Gw
        attached norm:  dL/dV = c[:, None] * (Gw - (<Gw_i, V_i> / norm(V_i)^2)[:, None] * V)
    i.e. the attached gradient loses its component along each row V_i (the radial one), because rescaling
    a row of V does not change W. DoRA's magnitude: dL/dm_i = <Gw_i, V_i> / norm(V_i).
    """
    _check_method(method)
    if detach_norm is None:
        detach_norm = method == "dora"
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    G = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
    V = W0 + delta_weight(method, params, alpha)  # (out, in)
    c = row_factor(method, V, W0, params, project)  # (out,)
    W = c[:, None] * V
    grads = {"x": (G @ W).reshape(x.shape)}
    Gw = G.T @ x2  # dL/dW: (out, in)
    if method == "lora" or (method == "d2lora" and not project):
        Gv = Gw
    else:
        Gv = c[:, None] * Gw
        if method == "dora":
            grads["magnitude"] = np.sum(Gw * V, axis=1) / np.maximum(row_norm(V), NORM_EPS)
        if not detach_norm:
            n2 = np.maximum(row_norm(V), NORM_EPS) ** 2
            Gv = Gv - (c * np.sum(Gw * V, axis=1) / n2)[:, None] * V
    # dV = s * B @ A  =>  dL/dB = s * Gv @ A.T,  dL/dA = s * B.T @ Gv
    if method in ("lora", "dora"):
        A, B = params["lora_A"], params["lora_B"]
        s = scaling(alpha, A.shape[0])
        grads["lora_A"], grads["lora_B"] = s * B.T @ Gv, s * Gv @ A.T
    else:
        r = params["lora_A_pos"].shape[0]
        s, tau = scaling(alpha, r), params["tau"]
        Ap, Bp, An, Bn = params["lora_A_pos"], params["lora_B_pos"], params["lora_A_neg"], params["lora_B_neg"]
        grads["lora_A_pos"], grads["lora_B_pos"] = s * Bp.T @ Gv, s * Gv @ Ap.T
        grads["lora_A_neg"], grads["lora_B_neg"] = -s * tau * Bn.T @ Gv, -s * tau * Gv @ An.T
        grads["tau"] = np.asarray(-s * np.sum(Gv * (Bn @ An)))
    return grads
