"""``.grad`` of a logged step against a plain step's: bitwise, except the weights fused mode summed.

Fused mode (gradcoh.logger.fused: ``fused="auto"``, the default, or ``fused=True``) takes a Linear, convolution or
Hugging Face ``Conv1D`` call's weight gradient from the per-example gradients it materialised: the same ``n·T``
products as autograd's weight-gradient GEMM, summed in another order, so both are rounded sums of the same terms and
differ by at most ``bound(2·n·T)`` times the sum of the terms' magnitudes (``Σ_{n,t} |δ_nt| |x_nt|ᵀ`` per entry,
computed here in float64 from the plain step's own inputs and output gradients). Every other parameter, and a fused
weight whose call kept autograd's op, must be bitwise equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tolerance import assert_close
from torch import nn

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fusable(mod: nn.Module) -> bool:
    """Linear, convolution, or Hugging Face ``Conv1D`` (GPT-2: ``addmm(bias, x, weight)``, weight ``[in, out]``)."""
    return type(mod) in _FUSABLE or type(mod).__name__ == "Conv1D"


def weight_grad_terms(model: nn.Module, run: Callable[[], None],
                      names: set[str] | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """Run ``run`` (a plain forward and backward of ``model``) and return, for each Linear/convolution weight (those
    in ``names``, default all), ``(Σ |terms| per entry in float64, terms per entry)`` summed over its calls."""
    seen: dict[str, list] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not _fusable(mod) or (names is not None and f"{name}.weight" not in names):
            continue

        def keep(m, args, out, name=name):
            call = [m, args[0].detach()]
            seen.setdefault(name, []).append(call)
            out.register_hook(lambda g: call.append(g.detach()))

        hooks.append(mod.register_forward_hook(keep))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, calls in seen.items():
        total, count = None, 0
        for m, x, *go in calls:
            got = _terms(m, x, go[0]) if go else None  # (no gradient reached the output: no terms)
            if got is None:
                continue
            terms, k = got
            total = terms if total is None else total + terms
            count += k
        if total is not None:
            out[f"{name}.weight"] = (total, count)
    return out


def _terms(m: nn.Module, x: torch.Tensor, go: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(Σ_{n,t} |δ_nt| |x_nt|ᵀ, n·T)`` of one call (None: a call fused mode never fuses)."""
    if isinstance(m, nn.Linear):
        return (torch.einsum("...o,...f->of", go.abs().double(), x.abs().double()),
                x.numel() // x.shape[-1])
    if type(m).__name__ == "Conv1D":  # weight [in, out]
        return (torch.einsum("...f,...o->fo", x.abs().double(), go.abs().double()),
                x.numel() // x.shape[-1])
    nd = x.dim() - 2
    pad = m.padding
    if m.padding_mode != "zeros":
        x, pad = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
    elif pad == "valid":
        pad = 0
    elif isinstance(pad, str):  # 'same': fused mode keeps autograd's op (bitwise), no terms needed
        return None
    terms = _CONV_WEIGHT[nd](x.abs().double(), m.weight.shape, go.abs().double(), m.stride, pad, m.dilation,
                             m.groups)
    return terms, go.shape[0] * go[0, 0].numel()


def assert_training_grads(logged: nn.Module, plain: nn.Module, fused_ids: frozenset[int] | set[int],
                          terms: dict[str, tuple[torch.Tensor, int]], what: str = "") -> int:
    """``.grad`` of ``logged`` against ``plain``'s: fused weights (ids in ``fused_ids``) to the rounding of their
    sums, every other parameter bitwise. Returns how many fused weights differ at all."""
    want = dict(plain.named_parameters())
    changed = 0
    for k, p in logged.named_parameters():
        g, h = p.grad, want[k].grad
        assert (g is None) == (h is None), f"{what} {k}: .grad present in one step only"
        if g is None or torch.equal(g, h):
            continue
        if id(p) not in fused_ids or k not in terms:
            raise AssertionError(f"{what} {k}: .grad differs from a plain step's and it is not a fused weight")
        scale, n_terms = terms[k]
        assert_close(g, h, n=2 * n_terms, scale=scale, dtype=str(g.dtype).removeprefix("torch."),
                     err_msg=f"{what} fused .grad {k}")
        changed += 1
    return changed
