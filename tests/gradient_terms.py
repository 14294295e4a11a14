"""The size of the terms behind each per-example gradient entry: the scale its float32 rounding error is bounded by.

:func:`tolerance.chain_length` counts the rounded operations on a per-example gradient's chain; the error they
leave is bounded relative to the sizes of the terms they add, not to the value: a backward sum ``Wᵀδ`` that cancels
(1.2230 − 1.2369, found by hypothesis in test_exact) keeps an error of the size of its terms, 177× its value. As
tests/fused_grads.py does for a weight gradient's last sum, this module propagates those sizes through the whole
network, in float64, one example at a time (first order in u):

- forward: ``ã_out = |J_x| ã_in + Σ_θ |J_θ| |θ|``: the input's error carried through the module's Jacobian (|W| ã
  for a Linear) and the sizes of its own products (|W| |x| + |b|); ``|J_x| ã_in + |out|`` for a module without
  parameters (its elementwise rounding: tanh, a reshape);
- the loss: ``b̃ = |∂ℓ/∂out| + |∇²ℓ| ã_out`` (the output's forward error moves the output gradient: 2(out − y) of a
  squared error, whose subtraction can cancel too);
- backward: ``b̃_in = |J_x|ᵀ b̃_out + |∂²(δ_outᵀ f)/∂x²| ã_in`` (|W|ᵀ b̃ for a Linear; a nonlinearity's gradient
  also moves with its input's forward error: tanh″, a norm's statistics);
- a parameter's gradient ``g̃_θ = |J_θ|ᵀ b̃_out + |∂²(δ_outᵀ f)/∂θ∂x| ã_in`` (Σ_t b̃_t |x_t|ᵀ + |δ_t| ã_tᵀ for a
  Linear).

By induction every forward value's error is at most ε·ã, every output gradient's ε·b̃, and each per-example
gradient's ε·g̃ with ε ≤ Σ γ over the chain's accumulations, :func:`tolerance.bound` of ``chain_length`` (each
module's own roundings are relative to terms no larger than ã, b̃). ``g̃ ≥ |g|`` entry by entry (``b̃ ≥ |δ|``), so
this scale is never stricter than the value itself, and equals a few times it when nothing cancels.

Defined for an ``nn.Sequential`` of leaf modules (the derivation walks the chain module by module; Jacobians by
torch.func, so sizes must stay small: the hypothesis test's models).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev


def gradient_terms(model: nn.Sequential, loss_fn, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{parameter name: [n, *shape]}`` float64 term sizes ``g̃ ≥ |g|`` of each example's gradient (module docstring).

    Args:
        model: An ``nn.Sequential`` of leaf modules.
        loss_fn: ``loss_fn(output, y)`` -> per-example losses ``[n]``.
        x: Batch of inputs (floating, or integer indices for a leading Embedding).
        y: Targets.

    """
    if not isinstance(model, nn.Sequential) or any(list(m.children()) for m in model):
        raise TypeError("gradient_terms: an nn.Sequential of leaf modules")
    m = copy.deepcopy(model).double()
    per: dict[str, list[torch.Tensor]] = {k: [] for k, p in m.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        xi = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        yi = y[i : i + 1].double() if y.is_floating_point() else y[i : i + 1]
        for k, v in _one_example(m, loss_fn, xi, yi).items():
            per[k].append(v)
    return {k: torch.stack(v) for k, v in per.items()}


def _one_example(m: nn.Sequential, loss_fn, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    backs = []  # (parameter prefix, the module's backward step)
    a = x.abs() if x.is_floating_point() else None
    for idx, mod in enumerate(m):
        step = (_bilinear if isinstance(mod, _BILINEAR) else _reshape if isinstance(mod, nn.Flatten)
                else _elementwise if isinstance(mod, _ELEMENTWISE) else _generic)
        x, a, back = step(mod, x, a)
        backs.append((str(idx), back))

    delta = grad(lambda o: loss_fn(o, y).sum())(x).detach()
    h = hessian(lambda o: loss_fn(o, y).sum())(x)
    b = delta.abs() + (_flat(h, x, x).abs() @ a.reshape(-1)).reshape(x.shape)

    terms = {}
    for prefix, back in reversed(backs):
        grads, delta, b = back(delta, b)
        terms.update({f"{prefix}.{k}": v for k, v in grads.items()})
        if delta is None:  # the first module of an integer input (an Embedding's lookup): nothing before it
            break
    return terms


_BILINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Modules whose every Jacobian entry is one weight or one input value (zero padding, reflection, groups): then
``|J_x| v = f(v; |W|, 0)``, ``|J_W|ᵀ v`` is the weight gradient at input ``|x|``, and the cross term
``|∂²(δᵀf)/∂W∂x| ã`` the weight gradient of input ã and output gradient |δ| (closed forms of the generic step)."""


def _bilinear(mod, x, a):
    w, bias = mod.weight.detach(), None if mod.bias is None else mod.bias.detach()

    def f(inp, weight, b=None):
        return F.linear(inp, weight, b) if isinstance(mod, nn.Linear) else mod._conv_forward(inp, weight, b)

    out = f(x, w, bias).detach()
    a_out = f(x.abs() + a, w.abs(), None if bias is None else bias.abs()).detach()  # |W| ã + (|W| |x| + |b|)

    def back(delta, b):
        wa = w.clone().requires_grad_(True)
        if bias is None:
            (gw,) = torch.autograd.grad(f(x.abs(), wa), [wa], b)
            grads = {}
        else:  # J_b's entries are ones: |J_b|ᵀ b̃ is the bias gradient of b̃
            ba = bias.clone().requires_grad_(True)
            gw, gb = torch.autograd.grad(f(x.abs(), wa, ba), [wa, ba], b)
            grads = {"bias": gb}
        zero = None if bias is None else torch.zeros_like(bias)
        (cross,) = torch.autograd.grad(f(a, wa, zero), [wa], delta.abs())
        grads["weight"] = gw + cross
        vin = torch.zeros_like(x, requires_grad=True)
        (b_in,) = torch.autograd.grad(f(vin, w.abs(), zero), [vin], b)
        (d_in,) = torch.autograd.grad(f(vin, w, zero), [vin], delta)
        return grads, d_in.detach(), b_in.detach()

    return out, a_out, back


_ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU, nn.SiLU)
"""Elementwise modules: diagonal Jacobian σ′ and second derivative σ″ (closed forms of the generic step)."""


def _elementwise(mod, x, a):
    xr = x.clone().requires_grad_(True)
    out = mod(xr)
    (d1,) = torch.autograd.grad(out.sum(), [xr], create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), [xr]) if d1.requires_grad else (torch.zeros_like(x),)
    d1 = d1.detach()

    def back(delta, b):
        return {}, d1 * delta, d1.abs() * b + (d2 * delta).abs() * a

    return out.detach(), d1.abs() * a + out.detach().abs(), back


def _reshape(mod, x, a):
    out = mod(x)

    def back(delta, b):
        return {}, delta.reshape(x.shape), b.reshape(x.shape)

    return out, None if a is None else mod(a), back


def _generic(mod, x, a):
    """Any leaf module, through its dense Jacobians (torch.func): small sizes only."""
    params = {k: p.detach() for k, p in mod.named_parameters()}

    def f(inp, ps):
        return functional_call(mod, ps, (inp,))

    out = f(x, params).detach()
    size = torch.zeros_like(out) if params else out.abs()  # the sizes of its own products, or its output's
    j_p = jacrev(f, argnums=1)(x, params) if params else {}
    for k, p in params.items():
        j_p[k] = _flat(j_p[k], out, p)
        size = size + (j_p[k].abs() @ p.abs().reshape(-1)).reshape(out.shape)
    j_x = None
    if a is not None:
        j_x = _flat(jacrev(f, argnums=0)(x, params), out, x)
        size = size + (j_x.abs() @ a.reshape(-1)).reshape(out.shape)

    def back(delta, b):
        def s(xx, ps):  # δ_outᵀ f: its gradients are the backward's, its second derivatives how they move with the
            return (functional_call(mod, ps, (xx,)) * delta).sum()  # input's forward error

        cross = jacrev(grad(s, argnums=1), argnums=0)(x, params) if params and a is not None else {}
        grads = {}
        for k, p in params.items():
            g = j_p[k].abs().T @ b.reshape(-1)
            if k in cross:
                g = g + _flat(cross[k], p, x).abs() @ a.reshape(-1)
            grads[k] = g.reshape(p.shape)
        if j_x is None:
            return grads, None, None
        h_x = _flat(hessian(s, argnums=0)(x, params), x, x)
        b_in = (j_x.abs().T @ b.reshape(-1) + h_x.abs() @ a.reshape(-1)).reshape(x.shape)
        return grads, (j_x.T @ delta.reshape(-1)).reshape(x.shape), b_in

    return out, size, back


def _flat(jac: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A Jacobian ``[*rows.shape, *cols.shape]`` as a matrix ``[rows.numel(), cols.numel()]``."""
    return jac.reshape(rows.numel(), cols.numel())
