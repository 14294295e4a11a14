"""One layer's batch gradient ``Σ_i g_i`` of a step: read from ``.grad``, or summed from the parameters' hooks.

When every tracked ``.grad`` is None as the step begins (``StepState.from_grad``) and the block holds one backward
pass, ``.grad`` is exactly that pass's gradient and is read at the end (no copy). A second backward pass (gradient
accumulation) or a probe (``torch.autograd.grad``) makes the parameter hooks sum the micro-batches' gradients, each
scaled to a sum over examples, in the step's accumulation type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .grads import natural_view

if TYPE_CHECKING:
    from .step import StepState


class BatchGradient:
    """The batch gradient of one layer's parameters over a recorded step.

    Args:
        name: The layer's name (for error messages).
        params: Its parameters.
    """

    def __init__(self, name: str, params: list[nn.Parameter]) -> None:
        self.name = name
        self.params = params
        self._state: StepState | None = None
        self._handles: list[RemovableHandle] = []
        self._sums: list[torch.Tensor | None] = []  # scaled, in acc_dtype
        self._seen: list[torch.Tensor | None] = []  # gradients of micro-batch 0 (from_grad)
        self._grad_versions: list[int | None] = []

    def attach(self, state: StepState) -> None:
        """Install one hook per parameter for one recorded step."""
        self._state = state
        self._sums = [None] * len(self.params)
        self._seen = [None] * len(self.params)
        self._grad_versions = []
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(lambda g, i=i: self._param_hook(i, g)))

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _param_hook(self, i: int, grad: torch.Tensor) -> None:
        state = self._state
        if state.uses.verifying:  # the verifier's extra pass (gradcoh.logger.verify) is not a micro-batch
            return
        state.in_backward(reached_parameter=True)
        if state.from_grad:
            if state.micro == 0:
                # .grad will hold exactly this backward's gradient; keep a reference (no copy) in case the pass
                # was torch.autograd.grad, which leaves .grad alone
                self._seen[i] = grad.detach()  # (a new tensor: holding autograd's own would make .grad a copy)
                return
            if self._sums[i] is None:  # a second backward: .grad holds micro-batch 0's gradient (so far)
                held = self._first_grad(i)
                self._sums[i] = (torch.zeros_like(grad, dtype=state.acc_dtype) if held is None
                                 else held.to(state.acc_dtype) * state.scale(0))
            self._sums[i] = self._sums[i] + grad.detach().to(state.acc_dtype) * state.scale()
            return
        g = grad.detach().to(state.acc_dtype, copy=True)  # never alias autograd's tensor (it may become .grad)
        scale = state.scale()
        if scale != 1.0:
            g *= scale
        self._sums[i] = g if self._sums[i] is None else self._sums[i] + g

    def _first_grad(self, i: int) -> torch.Tensor | None:
        p = self.params[i]
        return _graph_free(p.grad) if p.grad is not None else self._seen[i]

    def end_of_backward(self) -> None:
        """Note the versions of ``.grad``, to detect in-place changes of it before the step ends."""
        if self._state.from_grad:
            self._grad_versions = [None if p.grad is None else p.grad._version for p in self.params]

    def param_sum(self, i: int) -> tuple[torch.Tensor, float]:
        """One parameter's ``Σ_i g_i`` as ``(tensor, scale)``: the sum is ``scale · tensor`` (avoids a scaled copy)."""
        p, acc, state = self.params[i], self._sums[i], self._state
        if acc is not None:
            return acc, 1.0
        grad = p.grad if state.from_grad else None
        if grad is not None:
            if grad._version != self._grad_versions[i]:
                raise RuntimeError(
                    f"the .grad of layer '{self.name}' was modified in place inside the record block (e.g. gradient "
                    "clipping); do that after the block, which should hold only the forward and backward passes"
                )
            return _graph_free(grad), state.scale(0)
        if state.from_grad and self._seen[i] is not None:  # torch.autograd.grad: .grad stayed None
            return self._seen[i], state.scale(0)
        return torch.zeros(p.shape, dtype=state.acc_dtype, device=p.device), 1.0

    def natural(self, i: int) -> tuple[torch.Tensor, float]:
        """:meth:`param_sum` in the parameter's natural view."""
        t, scale = self.param_sum(i)
        return t.reshape(natural_view(tuple(self.params[i].shape))), scale

    def per_param(self) -> list[torch.Tensor]:
        """Each parameter's ``Σ_i g_i`` of this step (this process), in its natural view."""
        out = []
        for i in range(len(self.params)):
            m, scale = self.natural(i)
            out.append(m * scale if scale != 1.0 else m)
        return out

    def flat(self) -> torch.Tensor:
        """``[1, P]``: the parameters' ``Σ_i g_i`` flattened in order."""
        parts = []
        for i in range(len(self.params)):
            t, scale = self.param_sum(i)
            parts.append(t.reshape(-1) * scale if scale != 1.0 else t.reshape(-1))
        return torch.cat(parts).reshape(1, -1)

    def sq_norm(self) -> torch.Tensor:
        """``‖Σ_i g_i‖²`` in float64, parameter by parameter (no scaled copy)."""
        return sum(scale**2 * torch.dot(t.reshape(-1), t.reshape(-1)).to(torch.float64)
                   for t, scale in map(self.param_sum, range(len(self.params))))


def _graph_free(t: torch.Tensor) -> torch.Tensor:
    """``t`` without autograd history: ``t`` itself when it has none (``.detach()`` would add an op per parameter)."""
    return t.detach() if t.requires_grad else t
