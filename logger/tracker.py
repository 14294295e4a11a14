"""Per-layer trackers and the per-step state they fill: all hook state lives here, never on modules or tensors.

Each tracked layer gets, while a step is being recorded, one forward hook (capturing the call's inputs and putting a
tensor hook on its outputs) and one tensor hook per trainable parameter (capturing the batch gradient of this
backward). Tensor hooks on outputs, unlike ``register_full_backward_hook``, work with in-place operations that follow
the module (ResNet's ``out += identity``, ``ReLU(inplace=True)``). A layer is processed as soon as every call of it
in the current forward has received its output gradient; calls still open when the backward pass ends are
processed by an end-of-backward callback. Nothing here calls ``.item()`` or copies to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from .grads import LayerGrad, MatrixView, choose_route, combine
from .layers import Rule
from .sketch import TensorSketch


@dataclass
class StepState:
    """What one ``record`` block accumulates across its forward/backward passes (micro-batches).

    Attributes:
        n_groups: Number of groups ``G``.
        scale_by_batch: True for ``loss_reduction="mean"``: per-example gradients are ``n ×`` the batch terms.
        acc_dtype: Type of the batch- and group-sum accumulators: float32 for the batch stream (one backward per
            step, no rounding to accumulate; half the memory), float64 for probes (many micro-batches).
        from_grad: Every tracked ``.grad`` was None when the step began, so the batch sums are read from ``.grad``
            at the end (no copy); parameter hooks only start accumulating if a second backward pass comes.
        params_reached: The running backward pass reached a parameter (False for e.g. ``autograd.grad`` with
            respect to the inputs only, an adversarial step: such a pass is not a micro-batch and is discarded).
        group: ``[n_total]`` group of each example on the model's device, or None.
        sizes: Examples in each completed or current micro-batch.
        micro: Index of the current micro-batch (advanced at the end of each backward pass).
        callback_queued: Whether the end-of-backward callback is queued for the running backward pass.
        losses: Per-example losses passed to ``Recording.loss``.
        trackers: The layer trackers filling this state.
    """

    n_groups: int
    scale_by_batch: bool
    acc_dtype: torch.dtype = torch.float32
    from_grad: bool = False
    params_reached: bool = False
    group: torch.Tensor | None = None
    sizes: list[int] = field(default_factory=list)
    micro: int = 0
    callback_queued: bool = False
    losses: list[torch.Tensor] = field(default_factory=list)
    trackers: list[LayerTracker] = field(default_factory=list)

    def batch_size(self, n: int) -> int:
        """Register a forward call with ``n`` rows in the current micro-batch; returns the micro-batch size."""
        if len(self.sizes) <= self.micro:
            self.sizes.append(n)
        return self.sizes[self.micro]

    def scale(self, micro: int | None = None) -> float:
        """Factor from the batch loss's terms to each example's own loss (current micro-batch by default)."""
        return float(self.sizes[self.micro if micro is None else micro]) if self.scale_by_batch else 1.0

    def weights(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[n, G-1]`` one-hot group weights of the current micro-batch (the last group is implied)."""
        if self.n_groups == 1:
            return None
        if self.group is None:
            raise ValueError("groups were declared, so record(..., group=...) must give every example's group")
        start = sum(self.sizes[: self.micro])
        g = self.group[start : start + self.sizes[self.micro]]
        ids = torch.arange(self.n_groups - 1, device=g.device)
        return (g.unsqueeze(1) == ids).to(dtype)


@dataclass(eq=False)
class _Call:
    args: tuple
    kwargs: dict
    versions: list[tuple[torch.Tensor, int]]
    grads: tuple | None = None


class LayerTracker:
    """Owns the hooks and per-step results of one layer (a module with its own trainable parameters).

    Args:
        name: Qualified module name.
        module: The module.
        rule: Its layer rule.
        projector: Its sketch projection, or None without sketches.
        recurse: Own the parameters of the whole subtree (fallback layers), not only the module's own.
    """

    def __init__(self, name: str, module: nn.Module, rule: Rule, projector: TensorSketch | None,
                 recurse: bool = False) -> None:
        self.name = name
        self.module = module
        self.rule = rule
        self.projector = projector
        self.params = [p for p in module.parameters(recurse=recurse) if p.requires_grad]
        self.view = MatrixView.of([tuple(p.shape) for p in self.params])
        self.size = sum(p.numel() for p in self.params)
        self._handles: list[RemovableHandle] = []
        self._state: StepState | None = None
        self._calls: list[_Call] = []
        self._busy = False  # True while a rule runs: the torch.func fallback re-enters the module's forward
        self._grad_versions: list[int | None] = []
        self.reset()

    # --- lifecycle ---------------------------------------------------------------------------------------
    def attach(self, state: StepState) -> None:
        """Install the hooks for one recorded step."""
        self._state = state
        self.reset()
        self._handles.append(self.module.register_forward_hook(self._forward_hook, with_kwargs=True))
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(lambda g, i=i: self._param_hook(i, g)))

    def detach(self) -> None:
        """Remove every hook and drop captured tensors."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls = []

    def reset(self) -> None:
        """Forget the previous step's results."""
        self.sq: dict[int, torch.Tensor] = {}  # micro-batch -> [n]
        self.sketch: dict[int, torch.Tensor] = {}  # micro-batch -> [n, k]
        self.group_sums: dict[int, torch.Tensor] = {}  # micro-batch -> [G-1, rows, cols] in acc_dtype
        self.batch_grads: list[torch.Tensor | None] = [None] * len(self.params)  # scaled, acc_dtype

    # --- hooks -------------------------------------------------------------------------------------------
    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._busy:
            return
        outs = [o for o in pytree.tree_leaves(output) if torch.is_tensor(o)]
        needs = [o for o in outs if o.requires_grad]
        if not needs:
            return  # no gradient will flow (no_grad, frozen): nothing to record
        first = next(a for a in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a))
        self._state.batch_size(first.shape[0])
        detached = pytree.tree_map(lambda a: a.detach() if torch.is_tensor(a) else a, (args, kwargs))
        versions = [(a, a._version) for a in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        call = _Call(detached[0], detached[1], versions)
        self._calls.append(call)
        if len(outs) == 1:
            outs[0].register_hook(lambda g: self._on_grads(call, (g,)))
        else:
            positions = [i for i, o in enumerate(outs) if o.requires_grad]

            def on_all(grads: tuple, call: _Call = call, n: int = len(outs)) -> None:
                full: list = [None] * n
                for pos, g in zip(positions, grads, strict=True):
                    full[pos] = g
                self._on_grads(call, tuple(full))

            torch.autograd.graph.register_multi_grad_hook(needs, on_all, mode="all")

    def _on_grads(self, call: _Call, grads: tuple) -> None:
        if not any(c is call for c in self._calls):  # its forward was consumed by an earlier backward (retain_graph)
            raise RuntimeError(
                f"layer '{self.name}': a second backward pass through the same forward inside one record block "
                "(retain_graph=True) is not supported; combine the losses and call backward once"
            )
        self._queue_end_of_backward()
        call.grads = tuple(None if g is None else g.detach() for g in grads)
        if all(c.grads is not None for c in self._calls):
            self.process()

    def _param_hook(self, i: int, grad: torch.Tensor) -> None:
        state = self._state
        state.params_reached = True
        self._queue_end_of_backward()
        if state.from_grad:
            if state.micro == 0:
                return  # .grad will hold exactly this backward's gradient
            if self.batch_grads[i] is None:  # a second backward: .grad holds micro-batch 0's gradient (so far)
                held = self.params[i].grad
                self.batch_grads[i] = (torch.zeros_like(grad, dtype=state.acc_dtype) if held is None
                                       else held.detach().to(state.acc_dtype) * state.scale(0))
            self.batch_grads[i] = self.batch_grads[i] + grad.detach().to(state.acc_dtype) * state.scale()
            return
        g = grad.detach().to(state.acc_dtype, copy=True)  # never alias autograd's tensor (it may become .grad)
        scale = state.scale()
        if scale != 1.0:
            g *= scale
        self.batch_grads[i] = g if self.batch_grads[i] is None else self.batch_grads[i] + g

    def _queue_end_of_backward(self) -> None:
        state = self._state
        if not state.callback_queued:
            state.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_callback)

    def _end_callback(self) -> None:
        end_of_backward(self._state)

    # --- computation -------------------------------------------------------------------------------------
    def process(self) -> None:
        """Turn the captured calls of this micro-batch into per-example statistics and sketches."""
        calls, self._calls = [c for c in self._calls if c.grads is not None], []
        if not calls:
            return
        for c in calls:
            for tensor, version in c.versions:
                if tensor._version != version:
                    raise RuntimeError(
                        f"an input of layer '{self.name}' was modified in place after its forward; "
                        "per-example gradients need the original input (avoid the in-place op on it)"
                    )
        self._busy = True
        try:
            grad = combine([self.rule(self.module, *_upcast((c.args, c.kwargs, c.grads))) for c in calls])
            grad = choose_route(grad, self.projector)
            self._reduce(grad)
        finally:
            self._busy = False

    def _reduce(self, grad: LayerGrad) -> None:
        state = self._state
        scale = state.scale()
        if grad.n != state.sizes[state.micro]:
            raise ValueError(
                f"layer '{self.name}' saw {grad.n} rows but the micro-batch has {state.sizes[state.micro]} "
                "examples; per-example gradients need the batch on dimension 0 of every tracked layer's input"
            )
        self.sq[state.micro] = grad.sq_norms() * scale**2
        if self.projector is not None:
            self.sketch[state.micro] = grad.sketch(self.projector) * scale
        weights = state.weights(torch.float32)
        if weights is not None:
            self.group_sums[state.micro] = grad.group_sums(weights).to(state.acc_dtype) * scale

    def discard(self, micro: int) -> None:
        """Forget what a backward pass that reached no parameter produced for micro-batch ``micro``."""
        for results in (self.sq, self.sketch, self.group_sums):
            results.pop(micro, None)

    def flush_calls(self) -> None:
        """Process calls left open when the backward pass ended (outputs that got no gradient)."""
        if self._calls:
            self.process()
        if self._state.from_grad:  # to detect in-place changes of .grad before the step ends
            self._grad_versions = [None if p.grad is None else p.grad._version for p in self.params]

    # --- results -----------------------------------------------------------------------------------------
    def batch_sum(self) -> torch.Tensor:
        """``[rows, cols]`` Σ over examples of per-example gradients (parameter hooks, or ``.grad``)."""
        grads = [t * scale if scale != 1.0 else t for t, scale in map(self._param_sum, range(len(self.params)))]
        return self.view.to_matrix([g.unsqueeze(0) for g in grads])[0]

    def _param_sum(self, i: int) -> tuple[torch.Tensor, float]:
        """One parameter's Σ_i g_i as ``(tensor, scale)``: the sum is ``scale · tensor`` (avoids a scaled copy)."""
        p, acc = self.params[i], self.batch_grads[i]
        if acc is not None:
            return acc, 1.0
        if self._state.from_grad and p.grad is not None:
            if p.grad._version != self._grad_versions[i]:
                raise RuntimeError(
                    f"the .grad of layer '{self.name}' was modified in place inside the record block (e.g. gradient "
                    "clipping); do that after the block, which should hold only the forward and backward passes"
                )
            return p.grad.detach(), self._state.scale(0)
        return torch.zeros(p.shape, dtype=self._state.acc_dtype, device=p.device), 1.0

    def gram(self, n_groups: int) -> torch.Tensor:
        """``[G, G]`` float64 Gram matrix of the group sums (one process)."""
        if n_groups == 1:  # ‖Σ_i g_i‖² parameter by parameter: no matrix view, no scaled copy
            total = sum(scale**2 * torch.dot(t.reshape(-1), t.reshape(-1)).to(torch.float64)
                        for t, scale in map(self._param_sum, range(len(self.params))))
            return total.reshape(1, 1)
        sums = self.group_sum_matrix(n_groups)
        return (sums @ sums.T).to(torch.float64)

    def check_complete(self) -> None:
        """Refuse to report a layer whose parameters got gradients that its own forward calls did not produce."""
        got = [g is not None for g in self.batch_grads]
        if self._state.from_grad:
            got = [p.grad is not None for p in self.params]
        if not self.sq and any(got):
            raise RuntimeError(
                f"the parameters of layer '{self.name}' received gradients but the module's forward was never "
                "called (a parent uses its weights directly); exclude it with layers=... or register a rule for "
                "the parent module"
            )

    def per_example(self, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[n]`` squared norms and ``[n, k]`` sketches over all micro-batches (zeros where the layer was unused)."""
        device = self.params[0].device
        sq = [self.sq.get(j, torch.zeros(n, device=device)) for j, n in enumerate(sizes)]
        if self.projector is None:
            return torch.cat(sq), None
        k = self.projector.dim
        sk = [self.sketch.get(j, torch.zeros(n, k, device=device)) for j, n in enumerate(sizes)]
        return torch.cat(sq), torch.cat(sk)

    def group_sum_matrix(self, n_groups: int) -> torch.Tensor:
        """``[G, rows·cols]`` group sums ``Σ_{i∈g} g_i``; the last group is the total minus the others."""
        total = self.batch_sum().reshape(1, -1)
        if n_groups == 1:
            return total
        if not self.group_sums:
            sums = torch.zeros(n_groups - 1, total.shape[1], dtype=total.dtype, device=total.device)
        else:
            sums = sum(self.group_sums.values()).reshape(n_groups - 1, -1).to(total.dtype)
        return torch.cat([sums, total - sums.sum(0, keepdim=True)])


def _upcast(tree: Any) -> Any:
    """Half-precision tensors (autocast, bf16 models) as float32; other tensors and objects unchanged.

    Per-example statistics then neither overflow nor lose the precision the 2e-4 contract needs.
    """
    return pytree.tree_map(
        lambda a: a.float() if torch.is_tensor(a) and a.dtype in (torch.float16, torch.bfloat16) else a, tree
    )


def end_of_backward(state: StepState | None) -> None:
    """Close the current micro-batch: process open calls of every tracker, then advance the micro-batch index."""
    if state is None or not state.callback_queued:
        return
    for tracker in state.trackers:
        tracker.flush_calls()
    state.callback_queued = False
    if not state.params_reached:  # gradients of inputs only: nothing of it reaches the parameters
        for tracker in state.trackers:
            tracker.discard(state.micro)
        del state.sizes[state.micro:]
        return
    state.params_reached = False
    state.micro += 1
