"""Adversarial models (issue 23): every case is exact, flagged or a clear error — never silently wrong.

The oracle is independent of the logger: autograd's gradient of each example's own loss term ``losses[i]``
through the same batch forward (float64 copy of the model, one ``torch.autograd.grad`` per example). A case's
outcome is

* ``exact``: no error, every layer reconciled and verified, every stored value equal to the oracle's;
* ``flagged``: no error, and every layer whose values differ from the oracle's is flagged (``reconciled`` False);
* ``error``: the logger raised a clear error (a message naming what to do);
* ``silent``: a layer's values differ from the oracle's and nothing says so. Never allowed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from mutation import swapping_rule
from torch import nn

# float32 per-example values against a float64 oracle: a few hundred roundings of relative size 2^-24 each in the
# forward and backward of these tiny models (depth <= 4, width <= 16) stay well below 1e-4 relative to the largest
# value of a layer; a wrong attribution of an example moves a value by O(1) relative.
RTOL = 1e-4


@dataclass
class Outcome:
    kind: str  # exact | flagged | error | silent
    detail: str = ""
    errors: dict | None = None  # layer -> largest relative error of sq_norm / sum_sq_norm


def oracle(model: nn.Module, forward: Callable, inputs: tuple) -> dict[str, np.ndarray]:
    """``{parameter name: [n, numel]}``: gradient of each example's loss term through the same batch forward."""
    m = copy.deepcopy(model).double()
    dbl = tuple(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs)
    losses = forward(m, *dbl)
    named = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
    out: dict[str, list] = {k: [] for k, _ in named}
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], [p for _, p in named], retain_graph=True, allow_unused=True)
        for (k, p), g in zip(named, gs, strict=True):
            out[k].append((torch.zeros_like(p) if g is None else g).reshape(-1).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def run(model: nn.Module, forward: Callable, inputs: tuple, tmp_path, *, reduce: str = "mean",
        give_losses: bool = True, penalty: Callable | None = None, **kw) -> tuple[Outcome, list]:
    """Log one step of ``forward`` (per-example losses) reduced by ``reduce``; classify it against the oracle."""
    records: list = []
    kw.setdefault("loss_reduction", reduce if reduce in ("mean", "sum") else "mean")
    kw.setdefault("on_mismatch", "flag")
    try:
        with GradientLogger(model, tmp_path / "s.zarr", mode="overwrite", handle_sigterm=False, **kw) as glog:
            glog._output.put = lambda stream, step, record: records.append(record)
            with glog.record(0) as rec:
                losses = forward(model, *inputs)
                if give_losses:
                    rec.loss(losses)
                total = losses.mean() if reduce == "mean" else losses.sum() if reduce == "sum" else reduce(losses)
                if penalty is not None:
                    total = total + penalty(model)
                total.backward()
            names = [t.plan.param_names for t in glog.trackers]
            layer_names = [t.name for t in glog.trackers]
    except (ValueError, RuntimeError) as err:
        model.zero_grad()
        return Outcome("error", str(err)), records
    model.zero_grad()
    return classify(model, forward, inputs, records, names, layer_names), records


def classify(model: nn.Module, forward: Callable, inputs: tuple, records: list, names: list,
             layer_names: list) -> Outcome:
    """The outcome of a logged step (``records[0]``) against the oracle of ``forward``'s per-example losses."""
    grads = oracle(model, forward, inputs)
    record = records[0]
    errors, bad = {}, []
    for i, (layer, params) in enumerate(zip(layer_names, names, strict=True)):
        g = np.concatenate([grads[p] for p in params], 1)
        want_sq, want_sum = (g**2).sum(1), float((g.sum(0) ** 2).sum())
        got_sq, got_sum = record.sq_norm[:, i].astype(np.float64), float(record.sum_sq_norm[i])
        scale = max(float(np.abs(want_sq).max()), 1e-30)
        err = max(float(np.abs(got_sq - want_sq).max()) / scale, abs(got_sum - want_sum) / max(want_sum, 1e-30))
        errors[layer] = err
        if not err <= RTOL:
            bad.append((layer, bool(record.reconciled[i])))
    if not bad:
        ok = bool(np.all(record.reconciled))
        return Outcome("exact" if ok else "flagged", "all exact" + ("" if ok else " (flagged anyway)"), errors)
    silent = [layer for layer, flagged_ok in bad if flagged_ok]
    if silent:
        return Outcome("silent", f"wrong and reconciled: {silent}", errors)
    return Outcome("flagged", f"flagged: {[b for b, _ in bad]}", errors)


def sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------------------------
# The classes of issue 23, each a small model: forward(model, *inputs) -> per-example losses [n]
# ----------------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d_in=5, d=6, d_out=3):
        super().__init__()
        self.a = nn.Linear(d_in, d)
        self.b = nn.Linear(d, d_out)


def write_perm(m, x, y, perm):
    h = m.a(x)
    h2 = h.clone()
    h2[perm] = h  # rows written into an activation that already carries the batch
    return sq(m.b(torch.tanh(h2)), y)


def unsort(m, x, y, perm):
    h = torch.tanh(m.a(x))[perm]
    out = torch.empty_like(h)
    out[perm] = h  # undo the sort: rows back in order (exact when followed)
    return sq(m.b(out), y)


def partial_roll(m, x, y, perm):
    h = m.a(x)
    h2 = h.clone()
    h2[1:] = h[:-1]
    return sq(m.b(torch.tanh(h2)), y)


def diff_positional(m, x, y, perm):
    h = torch.tanh(m.a(x))
    d = torch.diff(h, 1, 0, prepend=h[:1])  # couples neighbouring examples; dim given positionally
    return sq(m.b(d), y)


def normalize_batch(m, x, y, perm):
    return sq(m.b(F.normalize(torch.tanh(m.a(x)), dim=0)), y)  # normalised across the batch


def normalize_batch_positional(m, x, y, perm):
    return sq(m.b(F.normalize(torch.tanh(m.a(x)), 2.0, 0)), y)


def outputs_reordered(m, x, y, perm):
    return sq(m.b(torch.tanh(m.a(x)))[perm], y)  # loss term i belongs to example perm[i]


def cumsum_batch(m, x, y, perm):
    return sq(m.b(torch.cumsum(torch.tanh(m.a(x)), 0)), y)


def centred(m, x, y, perm):
    h = torch.tanh(m.a(x))
    return sq(m.b(h - h.mean(0, keepdim=True)), y)  # batch statistics couple the examples


def cat_batch(m, x, y, perm):
    h = torch.tanh(m.a(x))
    both = torch.cat([h[1:], h[:1]], 0)  # a roll through cat along the batch
    return sq(m.b(both), y)


def transpose_mix(m, x, y, perm):
    h = torch.tanh(m.a(x))  # [n, d] with d == n: mixing along the batch through a transpose
    return sq(m.b(h.t().softmax(-1).t()), y)


def index_put_perm(m, x, y, perm):
    h = m.a(x)
    return sq(m.b(torch.tanh(h.clone().index_put_((perm,), h))), y)


def copy_roll(m, x, y, perm):
    h = m.a(x)
    h2 = h.clone()
    h2[1:].copy_(h[:-1])
    return sq(m.b(torch.tanh(h2)), y)


def index_select_reordered(m, x, y, perm):
    return sq(m.b(torch.tanh(m.a(x))).index_select(0, perm), y)


def diff_keyword(m, x, y, perm):
    h = torch.tanh(m.a(x))
    return sq(m.b(h.diff(dim=0, append=h[-1:])), y)


MIXING = {f.__name__: f for f in (write_perm, unsort, partial_roll, diff_positional, normalize_batch,
                                  normalize_batch_positional, outputs_reordered, cumsum_batch, centred, cat_batch,
                                  transpose_mix, index_put_perm, copy_roll, index_select_reordered, diff_keyword)}


def test_non_linear_function_of_the_loss_is_refused(tmp_path):
    """(mean loss)² couples the examples: no example has its own term; the layers refuse."""
    torch.manual_seed(0)
    model = MLP(5, 6, 3)
    outcome, _ = run(model, lambda m, x, y: sq(m.b(torch.tanh(m.a(x))), y), (torch.randn(6, 5), torch.randn(6, 3)),
                     tmp_path, reduce=lambda losses: losses.mean() ** 2, give_losses=False)
    assert outcome.kind == "error" and "'pow'" in outcome.detail, outcome


def test_unchanged_rows_written_back_stay_exact(tmp_path):
    """Writing constants into rows, or each example's rows into its own rows, keeps the layout (exact)."""
    torch.manual_seed(0)
    model = MLP(5, 6, 3)

    def forward(m, x, y):
        h = m.a(x)
        h2 = torch.zeros_like(h)
        h2[:, :3] = h[:, :3]  # every example's first features into its own row
        h2[0, 4] = 1.0  # a constant into one example's row
        h2[2] = h[2] * 2  # one example's row from that example
        return sq(m.b(torch.tanh(h2)), y)

    outcome, _ = run(model, forward, (torch.randn(6, 5), torch.randn(6, 3)), tmp_path)
    assert outcome.kind == "exact", outcome


@pytest.mark.parametrize("name", sorted(MIXING))
@pytest.mark.parametrize("give_losses", [True, False])
def test_mixing_along_the_batch_is_never_silent(name, give_losses, tmp_path):
    torch.manual_seed(0)
    n = 6
    model = MLP(5, n, 3)
    x, y = torch.randn(n, 5), torch.randn(n, 3)
    perm = torch.tensor([2, 0, 5, 1, 4, 3])
    outcome, _ = run(model, MIXING[name], (x, y, perm), tmp_path, give_losses=give_losses)
    assert outcome.kind != "silent", outcome
    if outcome.kind == "error":
        assert "gradcoh" in outcome.detail or "layer" in outcome.detail, outcome.detail


class Protos(nn.Module):
    """Class prototypes (not per-example) embedded by the same encoder; logits are distances to them."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 5)

    def forward(self, x, protos):
        h, p = torch.tanh(self.enc(x)), torch.tanh(self.enc(protos))
        return self.head(h) @ p.T


class MemoryBank(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 5)

    def forward(self, x, bank):
        h = self.enc(x)
        return h @ bank.T  # a constant bank of negatives


@pytest.mark.parametrize("kind", ["protos", "bank"])
@pytest.mark.parametrize("k", [6, 5])  # equal to n and not
def test_shared_second_input_of_length_n_is_not_per_example(kind, k, tmp_path):
    torch.manual_seed(1)
    n = 6
    model = Protos() if kind == "protos" else MemoryBank()
    x, second, y = torch.randn(n, 4), torch.randn(k, 4 if kind == "protos" else 5), torch.randint(0, k, (n,))

    def forward(m, x, second, y):
        return F.cross_entropy(m(x, second), y, reduction="none")

    outcome, _ = run(model, forward, (x, second, y), tmp_path)
    assert outcome.kind == "exact", outcome


class TwoTower(Protos):
    def forward(self, x, x2):
        return self.head(torch.tanh(self.enc(x))) * torch.tanh(self.enc(x2))  # example i's towers meet row-wise


@pytest.mark.parametrize("batch_inputs", [(0, 1), (0, "x2")])
def test_batch_inputs_names_the_batch_carrying_inputs(batch_inputs, tmp_path):
    """Two inputs of length n, both per example: batch_inputs says so; exact either way (shared is exact too)."""
    torch.manual_seed(2)
    n = 5
    x, x2, y = torch.randn(n, 4), torch.randn(n, 4), torch.randn(n, 5)

    def forward(m, x, x2, y):
        return sq(m(x, x2=x2) if batch_inputs[1] == "x2" else m(x, x2), y)

    for kw in ({"batch_inputs": batch_inputs}, {}):
        outcome, _ = run(TwoTower(), forward, (x, x2, y), tmp_path, **kw)
        assert outcome.kind == "exact", (kw, outcome)


def test_batch_inputs_of_different_lengths_is_refused(tmp_path):
    x, x2, y = torch.randn(5, 4), torch.randn(4, 4), torch.randn(5, 5)
    outcome, _ = run(Protos(), lambda m, x, x2, y: F.cross_entropy(m(x, x2), y.argmax(1)[:5] % 4, reduction="none"),
                     (x, x2, y), tmp_path, batch_inputs=(0, 1))
    assert outcome.kind == "error" and "batch_inputs" in outcome.detail, outcome


class Gather2d(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(k, 2)


def pick_separated(ys, xs):
    def forward(m, x, y):
        f = torch.tanh(m.conv(x))  # [n, C, H, W]
        picked = f[:, ys, :, xs]  # [k, n, H]: PyTorch moves the separated indexed dims to the front
        return sq(m.head(picked.permute(1, 0, 2).sum(-1)), y)

    return forward


@pytest.mark.parametrize("k", [4, 3])  # index length equal to n and not
def test_advanced_indices_separated_by_a_slice(k, tmp_path):
    torch.manual_seed(3)
    n = 4
    model = Gather2d(k)
    x, y = torch.randn(n, 2, 5, 5), torch.randn(n, 2)
    ys, xs = torch.tensor([0, 2, 1, 1][:k]), torch.tensor([1, 3, 0, 2][:k])
    outcome, _ = run(model, pick_separated(ys, xs), (x, y), tmp_path)
    assert outcome.kind == "exact", outcome


@pytest.mark.parametrize("lam", [1e-4, 1e-3])
def test_small_weight_penalty_is_flagged(lam, tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randn(32, 3)

    def forward(m, x, y):
        return sq(m(x), y)

    def penalty(m):
        return lam * sum(p.pow(2).sum() for p in m.parameters())

    outcome, _ = run(model, forward, (x, y), tmp_path, penalty=penalty)
    assert outcome.kind == "flagged", outcome
    with pytest.raises(RuntimeError, match="penalty"):
        run_raise(model, forward, (x, y), tmp_path, penalty)


def run_raise(model, forward, inputs, tmp_path, penalty):
    with GradientLogger(model, tmp_path / "r.zarr", mode="overwrite", handle_sigterm=False) as glog:
        with glog.record(0):
            (forward(model, *inputs).mean() + penalty(model)).backward()
    model.zero_grad()


class Linear3d(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        if self.how == "relu_":
            h = F.relu(h, inplace=True)
        elif self.how == "iadd":
            h += 1.0
        elif self.how == "masked_fill_":
            h.masked_fill_(x[..., :1] > 0.5, 0.0)
        elif self.how == "mul_":
            h.mul_(torch.linspace(0.5, 1.5, 5))
        return self.b(torch.tanh(h)).sum(1)


@pytest.mark.parametrize("how", ["relu_", "iadd", "masked_fill_", "mul_"])
def test_inplace_after_linear_on_3d_input_is_exact(how, tmp_path):
    torch.manual_seed(5)
    model = Linear3d(how)
    x, y = torch.randn(5, 3, 4), torch.randn(5, 2)
    outcome, _ = run(model, lambda m, x, y: sq(m(x), y), (x, y), tmp_path)
    assert outcome.kind == "exact", outcome


@pytest.mark.parametrize("declared,used", [("mean", "sum"), ("sum", "mean")])
def test_declared_reduction_contradicting_the_loss(declared, used, tmp_path):
    """With rec.loss the weights are observed: exact whatever is declared, or a clear error; never m² off."""
    torch.manual_seed(6)
    model = MLP(5, 6, 3)
    x, y = torch.randn(8, 5), torch.randn(8, 3)

    def forward(m, x, y):
        return sq(m.b(torch.tanh(m.a(x))), y)

    outcome, _ = run(model, forward, (x, y), tmp_path, reduce=used, loss_reduction=declared)
    assert outcome.kind == "error" and "loss_reduction" in outcome.detail, outcome


@pytest.mark.parametrize("factor", [1 / 8, 1.0, 1024 / 8, 1 / 32])
def test_observed_loss_weights(factor, tmp_path):
    """A common weight of the examples' terms (mean, sum, a loss scale, accumulation) is read from the backward pass:
    each example's own term is stored whatever the weight, when no reduction is declared."""
    torch.manual_seed(7)
    model = MLP(5, 6, 3)
    x, y = torch.randn(8, 5), torch.randn(8, 3)

    def forward(m, x, y):
        return sq(m.b(torch.tanh(m.a(x))), y)

    outcome, _ = run(model, forward, (x, y), tmp_path, reduce=lambda losses: losses.sum() * factor,
                     loss_reduction=None)
    assert outcome.kind == "exact", outcome


def test_different_weights_per_example_are_refused(tmp_path):
    torch.manual_seed(7)
    model = MLP(5, 6, 3)
    x, y, w = torch.randn(8, 5), torch.randn(8, 3), torch.rand(8) + 0.5
    outcome, _ = run(model, lambda m, x, y: sq(m.b(torch.tanh(m.a(x))), y), (x, y), tmp_path,
                     reduce=lambda losses: (losses * w).sum(), loss_reduction=None)
    assert outcome.kind == "error" and "weights" in outcome.detail, outcome


# ----------------------------------------------------------------------------------------------------------------
# The verifier
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_mismatch", ["raise", "flag"])
def test_verifier_sees_two_examples_swapped_inside_a_rule(on_mismatch, tmp_path):
    from gradcoh.logger.layers import default_rules, linear_rule

    torch.manual_seed(8)
    rules = default_rules()
    rules.register(nn.Linear, swapping_rule(linear_rule))
    model = MLP(5, 6, 3)
    x, y = torch.randn(2, 5), torch.randn(2, 3)  # two examples: the verifier's random example is one of the swapped

    def forward(m, x, y):
        return sq(m.b(torch.tanh(m.a(x))), y)

    if on_mismatch == "raise":
        with pytest.raises(RuntimeError, match=r"verifier.*'a'.*'b'"):
            run_verified(model, forward, (x, y), tmp_path, rules=rules)
    outcome, _ = run(model, forward, (x, y), tmp_path, rules=rules)
    assert outcome.kind == "flagged", outcome  # the guard alone cannot see it: sums are unchanged
    outcome, _ = run(model, forward, (x, y), tmp_path, rules=rules, verify_every=0)
    assert outcome.kind == "silent", outcome  # the mutation is real: without the verifier nothing says so


def run_verified(model, forward, inputs, tmp_path, **kw):
    with GradientLogger(model, tmp_path / "v.zarr", mode="overwrite", handle_sigterm=False, **kw) as glog:
        with glog.record(0) as rec:
            losses = forward(model, *inputs)
            rec.loss(losses)
            losses.mean().backward()
    model.zero_grad()


def test_verifier_schedule_and_grad_untouched(tmp_path):
    """First logged step with losses, then every verify_every-th; .grad equals a plain step's exactly."""
    from gradcoh.logger import verify

    torch.manual_seed(9)
    model = MLP(5, 6, 3)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    plain = copy.deepcopy(model)
    sq(plain.b(torch.tanh(plain.a(x))), y).mean().backward()
    calls = []
    original = verify.Verifier.capture

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    verify.Verifier.capture = counting
    try:
        with GradientLogger(model, tmp_path / "v.zarr", mode="overwrite", handle_sigterm=False,
                            verify_every=3, sketch_dim=8, alignment=True) as glog:
            for step in range(7):
                with glog.record(step) as rec:
                    losses = sq(model.b(torch.tanh(model.a(x))), y)
                    rec.loss(losses)
                    losses.mean().backward()
                for p, q in zip(model.parameters(), plain.parameters(), strict=True):
                    assert torch.equal(p.grad, q.grad)
                model.zero_grad()
    finally:
        verify.Verifier.capture = original
    assert len(calls) == 3  # steps 0, 3, 6


# ----------------------------------------------------------------------------------------------------------------
# Per-example selection, einsum, loops over examples, in-place ops with parameters (issue 24, item 3)
# ----------------------------------------------------------------------------------------------------------------

class Seq(nn.Module):
    def __init__(self, d=4, n_params=None):
        super().__init__()
        self.a = nn.Linear(3, d)
        self.b = nn.Linear(d, 2)
        self.p = nn.Parameter(torch.randn(d) * 0.3)
        self.protos = nn.Parameter(torch.randn(n_params or 5, d))


def _picks(x):
    return (x[..., 0] > 0).long() * 2 + (x[..., 1] > 0).long()  # [n, T] per-example indices in 0..3


def sel_gather(m, x, y):
    h = torch.tanh(m.a(x))  # [n, T, d]
    idx = _picks(x).unsqueeze(-1).expand(-1, -1, h.shape[-1])
    return sq(m.b(torch.gather(h, 1, idx)).sum(1), y)


def sel_take_along_dim(m, x, y):
    h = torch.tanh(m.a(x))
    return sq(m.b(torch.take_along_dim(h, _picks(x).unsqueeze(-1), 1)).sum(1), y)


def sel_arange(m, x, y):
    h = torch.tanh(m.a(x))
    last = _picks(x)[:, 0]  # one position per example, chosen by its own data
    return sq(m.b(h[torch.arange(h.shape[0]), last]), y)


def sel_einsum(m, x, y):
    h = torch.tanh(m.a(x))
    att = torch.einsum("btd,bsd->bts", h, h).softmax(-1)
    return sq(m.b(torch.einsum("bts,bsd->btd", att, h)).sum(1), y)


def sel_einsum_ellipsis(m, x, y):
    h = torch.tanh(m.a(x))
    return sq(m.b(torch.einsum("...d,d->...d", h, torch.linspace(0.5, 1.5, h.shape[-1]))).sum(1), y)


def loop_unbind(m, x, y):
    h = torch.tanh(m.a(x))
    return sq(m.b(torch.stack([r.softmax(-1) * 2 for r in h.unbind(0)])).sum(1), y)


def loop_slices(m, x, y):
    h = torch.tanh(m.a(x))
    return sq(m.b(torch.cat([h[i : i + 1].flip(1).cumsum(1) for i in range(h.shape[0])])).sum(1), y)


def inplace_parameter(m, x, y):
    h = m.a(x)
    h.add_(m.p)  # an in-place op with a parameter
    return sq(m.b(torch.tanh(h)).sum(1), y)


def parameter_of_size_n(m, x, y):
    h = torch.tanh(m.a(x)).mean(1)  # [n, d]
    return sq(h @ m.protos.T, y)  # protos [n, d]: a parameter with a dimension equal to n, shared by all


SELECTION = {f.__name__: f for f in (sel_gather, sel_take_along_dim, sel_arange, sel_einsum, sel_einsum_ellipsis,
                                     loop_unbind, loop_slices, inplace_parameter, parameter_of_size_n)}


@pytest.mark.parametrize("name", sorted(SELECTION))
def test_per_example_selection_is_exact(name, tmp_path):
    torch.manual_seed(10)
    n = 5
    model = Seq(4, n)
    x = torch.randn(n, 4, 3)
    y = torch.randn(n, n if name == "parameter_of_size_n" else 2)
    outcome, _ = run(model, SELECTION[name], (x, y), tmp_path)
    assert outcome.kind == "exact", outcome


def sel_wrong_rows(m, x, y):
    h = torch.tanh(m.a(x))
    return sq(m.b(h[torch.arange(h.shape[0]).flip(0), 0]), y)  # each example takes another example's row


def loop_out_of_order(m, x, y):
    h = torch.tanh(m.a(x))
    return sq(m.b(torch.stack(list(reversed(h.unbind(0))))).sum(1), y)


def einsum_over_batch(m, x, y):
    h = torch.tanh(m.a(x))
    return sq(m.b(h * torch.einsum("btd->td", h).unsqueeze(0)).sum(1), y)


@pytest.mark.parametrize("fwd", [sel_wrong_rows, loop_out_of_order, einsum_over_batch])
def test_selection_across_examples_is_refused(fwd, tmp_path):
    torch.manual_seed(11)
    model = Seq(4)
    outcome, _ = run(model, fwd, (torch.randn(5, 4, 3), torch.randn(5, 2)), tmp_path)
    assert outcome.kind == "error", outcome


def test_python_sum_of_per_example_losses_is_a_loss(tmp_path):
    """sum(losses) / n adds the examples' terms one by one: a plain loss, exact (its weights are declared, not seen:
    it warns so)."""
    torch.manual_seed(12)
    model = MLP(5, 6, 3)
    with pytest.warns(UserWarning, match="could not observe"):
        outcome, _ = run(model, lambda m, x, y: sq(m.b(torch.tanh(m.a(x))), y), (torch.randn(6, 5),
                         torch.randn(6, 3)), tmp_path, reduce=lambda losses: sum(losses) / 6, give_losses=False)
    assert outcome.kind == "exact", outcome


def test_dropout_on_a_parameter_outside_its_module_is_exact(tmp_path):
    """A derived tensor through train-mode dropout (a position table) replays its own mask per example."""
    torch.manual_seed(13)
    model = Seq(4)

    def forward(m, x, y):
        torch.manual_seed(5)  # the same masks in the logged run and the oracle's
        h = m.a(x) + F.dropout(m.p, 0.5, training=True)
        return sq(m.b(torch.tanh(h)).sum(1), y)

    outcome, _ = run(model, forward, (torch.randn(5, 4, 3), torch.randn(5, 2)), tmp_path)
    assert outcome.kind == "exact", outcome


# ----------------------------------------------------------------------------------------------------------------
# A declared loss_reduction without rec.loss: the reduction is observed (logger/reduction.py)
# ----------------------------------------------------------------------------------------------------------------

def run_batch_loss(model: nn.Module, per_example: Callable, batch_loss: Callable, inputs: tuple, tmp_path,
                   **kw) -> Outcome:
    """Log one step of ``batch_loss(model, *inputs)`` (no ``rec.loss``); classify it against the oracle of the
    per-example losses ``per_example`` (written out independently: each example's term of the loss, times n for a
    mean, as the stored values are defined)."""
    records: list = []
    try:
        with GradientLogger(model, tmp_path / "b.zarr", mode="overwrite", handle_sigterm=False, on_mismatch="flag",
                            **kw) as glog:
            glog._output.put = lambda stream, step, record: records.append(record)
            with glog.record(0):
                batch_loss(model, *inputs).backward()
            names, layer_names = [t.plan.param_names for t in glog.trackers], [t.name for t in glog.trackers]
    except (ValueError, RuntimeError) as err:
        model.zero_grad()
        return Outcome("error", str(err))
    model.zero_grad()
    return classify(model, per_example, inputs, records, names, layer_names)


def _ce(out, y):  # each example's cross-entropy, written out (the oracle does not call F.cross_entropy)
    return -out.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


class TokenLM(nn.Module):
    def __init__(self, vocab=7, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _lm_inputs(n=6, t=5, vocab=7):
    ids = torch.randint(0, vocab, (n, t))
    labels = torch.randint(0, vocab, (n, t))
    labels[torch.arange(t)[None, :] < (torch.arange(n) % t)[:, None]] = -100  # 5, 4, 3, 2, 1, 5 labelled tokens
    return ids, labels


def _token_terms(m, ids, labels, weight=None):
    """n × each example's term of the token mean over labelled tokens (weighted by class weights)."""
    kept = labels != -100
    tok = _ce(m(ids), labels.clamp(min=0))
    w = kept.to(tok.dtype) if weight is None else weight.to(tok.dtype)[labels.clamp(min=0)] * kept
    return ids.shape[0] * (w * tok).sum(1) / w.sum()


CLASS_W = torch.tensor([0.5, 2.0, 1.0])

# name -> (model kind, batch loss, per-example loss of the stored values, reduction in effect)
LOSSES = {
    "cross_entropy sum": ("mlp", lambda m, x, y: F.cross_entropy(m(x), y, reduction="sum"),
                          lambda m, x, y: _ce(m(x), y), "sum"),
    "cross_entropy mean": ("mlp", lambda m, x, y: F.cross_entropy(m(x), y), lambda m, x, y: _ce(m(x), y), "mean"),
    "CrossEntropyLoss class weights": (
        "mlp", lambda m, x, y: nn.CrossEntropyLoss(weight=CLASS_W.to(x.dtype))(m(x), y),
        lambda m, x, y: x.shape[0] * CLASS_W.to(x.dtype)[y] * _ce(m(x), y) / CLASS_W.to(x.dtype)[y].sum(), "mean"),
    "nll_loss sum": ("mlp", lambda m, x, y: F.nll_loss(m(x).log_softmax(1), y, reduction="sum"),
                     lambda m, x, y: _ce(m(x), y), "sum"),
    "mse_loss mean (n x 3 entries)": ("mlp", lambda m, x, y: F.mse_loss(m(x), F.one_hot(y, 3).to(x.dtype)),
                                      lambda m, x, y: ((m(x) - F.one_hot(y, 3).to(x.dtype)) ** 2).mean(1), "mean"),
    "MSELoss sum": ("mlp", lambda m, x, y: nn.MSELoss(reduction="sum")(m(x), F.one_hot(y, 3).to(x.dtype)),
                    lambda m, x, y: ((m(x) - F.one_hot(y, 3).to(x.dtype)) ** 2).sum(1), "sum"),
    "l1_loss sum": ("mlp", lambda m, x, y: F.l1_loss(m(x), F.one_hot(y, 3).to(x.dtype), reduction="sum"),
                    lambda m, x, y: (m(x) - F.one_hot(y, 3).to(x.dtype)).abs().sum(1), "sum"),
    "huber_loss mean": ("mlp", lambda m, x, y: F.huber_loss(m(x), F.one_hot(y, 3).to(x.dtype), delta=0.5),
                        lambda m, x, y: _huber(m(x) - F.one_hot(y, 3).to(x.dtype), 0.5).mean(1), "mean"),
    "smooth_l1_loss sum": ("mlp", lambda m, x, y: F.smooth_l1_loss(m(x), F.one_hot(y, 3).to(x.dtype), beta=0.5,
                                                                    reduction="sum"),
                           lambda m, x, y: _huber(m(x) - F.one_hot(y, 3).to(x.dtype), 0.5).sum(1) / 0.5, "sum"),
    "bce_with_logits mean": ("mlp", lambda m, x, y: F.binary_cross_entropy_with_logits(m(x), F.one_hot(y, 3).to(
        x.dtype)), lambda m, x, y: _bce(m(x), F.one_hot(y, 3).to(x.dtype)).mean(1), "mean"),
    "binary_cross_entropy sum": ("mlp", lambda m, x, y: F.binary_cross_entropy(torch.sigmoid(m(x)), F.one_hot(
        y, 3).to(x.dtype), reduction="sum"), lambda m, x, y: _bce(m(x), F.one_hot(y, 3).to(x.dtype)).sum(1), "sum"),
    "kl_div batchmean": ("mlp", lambda m, x, y: F.kl_div(m(x).log_softmax(1), _soft(y, x.dtype),
                                                         reduction="batchmean"),
                         lambda m, x, y: (_soft(y, x.dtype) * (_soft(y, x.dtype).log() - m(x).log_softmax(1))).sum(1),
                         "mean"),
    "losses.sum() / n": ("mlp", lambda m, x, y: _ce(m(x), y).sum() / x.shape[0], lambda m, x, y: _ce(m(x), y),
                         "mean"),
    "losses.mean() * n": ("mlp", lambda m, x, y: _ce(m(x), y).mean() * x.shape[0], lambda m, x, y: _ce(m(x), y),
                          "sum"),
    "token LM mean over labelled tokens (ignore_index)": (
        "lm", lambda m, ids, labels: F.cross_entropy(m(ids).flatten(0, 1), labels.flatten()), _token_terms, "mean"),
    "token LM sum (ignore_index)": (
        "lm", lambda m, ids, labels: F.cross_entropy(m(ids).flatten(0, 1), labels.flatten(), reduction="sum"),
        lambda m, ids, labels: _token_terms(m, ids, labels) * (labels != -100).sum() / ids.shape[0], "sum"),
    "token LM class weights": (
        "lm", lambda m, ids, labels: F.cross_entropy(m(ids).flatten(0, 1), labels.flatten(),
                                                     weight=torch.linspace(0.5, 2, 7, dtype=m.head.weight.dtype)),
        lambda m, ids, labels: _token_terms(m, ids, labels, torch.linspace(0.5, 2, 7)), "mean"),
}


def _huber(d, delta):
    a = d.abs()
    return torch.where(a < delta, 0.5 * d**2, delta * (a - 0.5 * delta))


def _bce(z, t):
    return -(t * torch.sigmoid(z).log() + (1 - t) * (1 - torch.sigmoid(z)).log())


def _soft(y, dtype):
    return (F.one_hot(y, 3).to(dtype) + 0.1) / 1.3


def _loss_case(name):
    torch.manual_seed(11)
    kind, batch_loss, per_example, used = LOSSES[name]
    if kind == "lm":
        return TokenLM(), batch_loss, per_example, _lm_inputs(), used
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, batch_loss, per_example, (torch.randn(6, 5), torch.randint(0, 3, (6,))), used


@pytest.mark.parametrize("name", list(LOSSES))
def test_declared_reduction_without_rec_loss(name, tmp_path):
    """Without rec.loss: a declared loss_reduction contradicting the loss raises naming the fix; the right one, or
    none (the observed one is used), is exact against the oracle of each example's term (n x it for a mean)."""
    model, batch_loss, per_example, inputs, used = _loss_case(name)
    wrong = {"mean": "sum", "sum": "mean"}[used]
    outcome = run_batch_loss(model, per_example, batch_loss, inputs, tmp_path, loss_reduction=wrong)
    assert outcome.kind == "error" and f"loss_reduction={used!r}" in outcome.detail, outcome
    for declared in (used, None):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # observed: no "could not observe" warning
            outcome = run_batch_loss(model, per_example, batch_loss, inputs, tmp_path, loss_reduction=declared)
        assert outcome.kind == "exact", (declared, outcome)


def test_unobserved_reduction_warns_once(tmp_path):
    """A reduction gradcoh cannot see (a Python sum over the examples) warns once that the weights are declared, not
    verified, naming rec.loss; with rec.loss the same loss is exact and silent."""
    torch.manual_seed(12)
    model = MLP(5, 6, 3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))

    def forward(m, x, y):
        return _ce(m.b(torch.tanh(m.a(x))), y)

    def python_sum(losses):
        return sum(losses[i] for i in range(losses.shape[0]))

    with pytest.warns(UserWarning, match=r"could not observe how the loss combines.*declared, not verified.*rec\.loss"):
        outcome, _ = run(model, forward, (x, y), tmp_path, reduce=python_sum, give_losses=False, loss_reduction="sum")
    assert outcome.kind == "exact", outcome  # (declared right: exact, but only declared)
    with GradientLogger(model, tmp_path / "w.zarr", handle_sigterm=False) as glog:
        with pytest.warns(UserWarning, match="could not observe"):
            for step in range(2):  # once per logger
                with glog.record(step):
                    python_sum(forward(model, x, y)).backward()
                model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        outcome, _ = run(model, forward, (x, y), tmp_path, reduce=python_sum, loss_reduction=None)
    assert outcome.kind == "exact", outcome


@pytest.mark.parametrize("n", [1, 6])
def test_reduction_check_never_refuses_a_right_declaration(n, tmp_path):
    """A common factor after a mean (accumulation: loss / 4) keeps it a mean; with one example mean = sum."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    outcome = run_batch_loss(model, lambda m, x, y: _ce(m(x), y) / 4, lambda m, x, y: F.cross_entropy(m(x), y) / 4,
                             (x, y), tmp_path, loss_reduction="mean")
    assert outcome.kind == "exact", outcome
    outcome = run_batch_loss(model, lambda m, x, y: _ce(m(x), y), lambda m, x, y: F.cross_entropy(m(x), y,
                             reduction="sum"), (x, y), tmp_path, loss_reduction="sum" if n > 1 else "mean")
    assert outcome.kind == "exact", outcome
