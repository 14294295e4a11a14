"""Independent oracles for per-example gradients: torch.func.vmap(grad) and a float64 per-example loop."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from gradcoh.logger.sketch import Projection, tensorsketch_blocks
from torch import nn
from torch.func import functional_call, grad, vmap


def open_logged(path, stream: str = "batch"):
    """A logged stream as a loaded xarray Dataset, with the store's layer table (root attributes) in its attrs.

    The oracle groups parameters into layers from what the *store* says (each layer's ``params``), not from the
    logger's rules, so that a bug in the layer split would show up as a mismatch instead of being copied.
    """
    import xarray as xr
    import zarr

    # chunks=None: numpy-backed (lazily indexed) variables, read straight from zarr. Dask adds nothing to a read
    # that is loaded at once, only ~40 ms of graph overhead per call (hundreds of calls in the suite).
    ds = xr.open_zarr(path, group=stream, consolidated=False, chunks=None).load()
    ds.attrs["gradcoh_layers"] = zarr.open_group(str(path), mode="r", use_consolidated=False).attrs["gradcoh_layers"]
    return ds


def layer_params(ds) -> dict[str, list[str]]:
    """Stored layer name -> its trainable parameter names (full names), from the store's layer table."""
    return {layer["name"]: layer["params"] for layer in ds.attrs["gradcoh_layers"]}


def per_example_grads_vmap(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    """Per-example gradients {param name: [n, *shape]} in float64 via torch.func.vmap(grad)."""
    m = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y

    def one(p, xi, yi):
        out = functional_call(m, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def per_example_grads_loop(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    """The same with an explicit float64 loop over examples (no torch.func)."""
    m = copy.deepcopy(model).double()
    out: dict[str, list] = {k: [] for k, p in m.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        m.zero_grad()
        xi = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        yi = y[i : i + 1].double() if y.is_floating_point() else y[i : i + 1]
        loss_fn(m(xi), yi).sum().backward()
        for k, p in m.named_parameters():
            if p.requires_grad:
                out[k].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def layer_matrix(grads: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """[n, P_l] per-example gradient of one layer (its parameters flattened and concatenated)."""
    return torch.cat([grads[k].flatten(1) for k in names], 1).numpy()


def expected_stats(ds, grads, group=None, n_groups=1):
    """Per-layer oracle statistics: sq_norm [n, L], sum_sq_norm [L], group_gram [L, G, G].

    Args:
        ds: The logged dataset from :func:`open_logged` (for the layer → parameter map).
        grads: Oracle per-example gradients ``{parameter name: [n, *shape]}``.
    """
    layers = layer_params(ds)

    sq, sums, grams = [], [], []
    for names in layers.values():
        g = layer_matrix(grads, names)
        sq.append((g**2).sum(1))
        s = g.sum(0)
        sums.append(s @ s)
        grp = np.zeros(g.shape[0], dtype=int) if group is None else np.asarray(group)
        gs = np.stack([g[grp == a].sum(0) for a in range(n_groups)])
        grams.append(gs @ gs.T)
    return np.stack(sq, 1), np.array(sums), np.stack(grams)


def layer_norms(ds, grads) -> np.ndarray:
    """[n, L] norms ‖g_{i,l}‖ of the oracle per-example gradients: the size of every term the statistics sum."""
    return np.stack([np.linalg.norm(layer_matrix(grads, names), axis=1) for names in layer_params(ds).values()], 1)


def assert_stats(ds, step, grads, *, n, group=None, n_groups=1, dtype="float32", what="", terms=None):
    """The stored ``sq_norm``, ``sum_sq_norm``, ``group_gram`` and m-coherence of ``step`` against the oracle.

    Each within the derived bound of tests/tolerance.py for accumulation length ``n``, relative to the size of its
    terms: ``sq_norm`` to itself (squares do not cancel), ``sum_sq_norm`` to (Σᵢ‖gᵢ‖)², a Gram entry (a, b) to
    (Σ_{i∈a}‖gᵢ‖)(Σ_{j∈b}‖gⱼ‖), the m-coherence to Σ_l (Σᵢ‖g_{i,l}‖)² / Σ sq_norm; all products of two computed
    vectors (κ = :data:`tolerance.PRODUCT`).

    ``terms``: the sizes g̃ ≥ |g| of the terms behind each per-example gradient entry
    (tests/gradient_terms.py), for gradients whose own backward sums may cancel; then ``sq_norm`` is measured
    against Σ_j |g_j| g̃_j and every ‖gᵢ‖ above becomes ‖g̃ᵢ‖.
    """
    from tolerance import PRODUCT, assert_close, sum_scale

    sq, sums, gram = expected_stats(ds, grads, group, n_groups)
    norms = layer_norms(ds, grads if terms is None else terms)
    sq_scale = sq if terms is None else np.stack(
        [(np.abs(layer_matrix(grads, p)) * layer_matrix(terms, p)).sum(1) for p in layer_params(ds).values()], 1)
    m = sq.shape[0]
    grp = np.zeros(m, dtype=int) if group is None else np.asarray(group)
    by_group = np.stack([norms[grp == a].sum(0) for a in range(n_groups)], 1)  # [L, G]
    kw = {"n": n, "kappa": PRODUCT, "dtype": dtype}
    assert_close(ds.sq_norm.values[step, :m], sq, scale=sq_scale, err_msg=f"{what} sq_norm", **kw)
    assert_close(ds.sum_sq_norm.values[step], sums, scale=sum_scale(norms, axis=0), err_msg=f"{what} sum_sq_norm",
                 **kw)
    assert_close(ds.group_gram.values[step], gram, scale=by_group[:, :, None] * by_group[:, None, :],
                 err_msg=f"{what} group_gram", **kw)
    stored = ds.sum_sq_norm.values[step].sum() / np.nansum(ds.sq_norm.values[step])
    # A/B moves by ΔA/B + (A/B)·ΔB/B: with cancelling gradients ΔB's scale Σ|g|g̃ can far exceed B itself
    coherence_scale = sum_scale(norms, axis=0).sum() / sq.sum()
    if terms is not None:
        coherence_scale += sums.sum() * sq_scale.sum() / sq.sum() ** 2
    assert_close(stored, sums.sum() / sq.sum(), scale=coherence_scale, err_msg=f"{what} m-coherence", **kw)


def same_forward_grads(model, losses_fn, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's gradient through one batch forward, in float64: ``({name: [n, P]}, losses [n])``.

    The oracle for models whose examples share a forward (dropout in train mode): a float64 copy of the model runs
    the batch forward from the same seed (the same dropout masks; callers check that the losses agree with the
    logged forward), then ``autograd.grad`` of each example's own loss term alone. No gradcoh code.
    """
    m = copy.deepcopy(model).double()
    torch.manual_seed(seed)
    losses = losses_fn(m)
    named = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
    out: dict[str, list] = {k: [] for k, _ in named}
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], [p for _, p in named], retain_graph=True, allow_unused=True)
        for (k, p), g in zip(named, grads, strict=True):
            out[k].append((torch.zeros_like(p) if g is None else g).reshape(-1))
    return {k: torch.stack(v) for k, v in out.items()}, losses.detach()


def log_same_forward(model, losses_fn, path, seed: int = 0, **options):
    """Log one step of ``losses_fn(model).sum()`` from ``seed``; returns ``(dataset, oracle grads)``.

    Raises AssertionError when the logged forward's losses differ from the oracle's (different dropout masks).
    """
    from gradcoh.logger import GradientLogger

    grads, want = same_forward_grads(model, losses_fn, seed)
    with GradientLogger(model, path, loss_reduction="sum", handle_sigterm=False, **options) as glog:
        with glog.record(0):
            torch.manual_seed(seed)
            losses = losses_fn(model)
            losses.sum().backward()
    # the same forward in float32 and float64: each loss within the float32 bound of the model's chain, against the
    # loss's own size plus 1 (a cross-entropy's terms, log-sum-exp and the target logit, are at least that large)
    from tolerance import assert_close, chain_length

    want = want.numpy()
    assert_close(losses.detach().double().numpy(), want, n=chain_length(model, positions=losses.shape[0]),
                 scale=np.abs(want) + 1.0, err_msg="same-forward losses")
    return open_logged(path), grads


def grads_chain_length(grads, positions: int = 16) -> int:
    """:func:`tolerance.chain_length` from oracle gradients ``{name: [m, *shape]}`` (the model is not at hand).

    ``positions``: 16, at least the sequence length or feature-map size of the tests that rely on the default.
    """
    from tolerance import PER_MODULE

    n = 0
    for g in grads.values():
        shape = tuple(g.shape[1:])
        n += positions + PER_MODULE + (int(np.prod(shape[1:])) + shape[0] if len(shape) >= 2 else 0)
    return n


def assert_layers_exact(ds, grads, *, n=None) -> None:
    """Every logged layer's per-example squared norm against the oracle, within the derived bound of
    tests/tolerance.py for accumulation length ``n`` (a square of a computed gradient: κ = 2); every layer
    reconciled.

    ``n`` defaults to the chain of the parameters in ``grads`` (:func:`grads_chain_length`).
    """
    from tolerance import PRODUCT, assert_close

    m = next(iter(grads.values())).shape[0]
    n = grads_chain_length(grads) if n is None else n
    for i, layer in enumerate(ds.attrs["gradcoh_layers"]):
        g = torch.cat([grads[p].reshape(m, -1) for p in layer["params"]], 1).numpy()
        assert_close(ds.sq_norm.values[0, :m, i], (g**2).sum(1), n=n, kappa=PRODUCT, err_msg=layer["name"])
    assert bool(ds.reconciled.values.all())


def hooked_factors(model, loss_fn, x, y):
    """Each Linear/Conv2d parameter's per-example gradients as factors, from plain autograd hooks on the same
    (float32) forward the logger sees (``loss_fn(output, y)``: per-example losses): ``{name: (u [n, T, rows],
    v [n, T, cols] or None for a bias)}`` in float64, with
    ``G_n = Σ_t u[n, t] v[n, t]ᵀ`` (a bias: ``Σ_t u[n, t]``, one column)."""
    seen, handles = {}, []

    def keep(name):
        def hook(module, inputs, out):
            seen[name] = [inputs[0].detach()]
            out.register_hook(lambda g: seen[name].append(g.detach()))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(keep(name)))
    loss_fn(model(x), y).sum().backward()  # summed per-example losses: the output gradients are each example's own
    model.zero_grad()
    for h in handles:
        h.remove()
    forms = {}
    for name, (inp, out_grad) in seen.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            v = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            u = out_grad.flatten(2).transpose(1, 2)
        else:
            v, u = inp[:, None], out_grad[:, None]
        forms[f"{name}.weight"], forms[f"{name}.bias"] = (u.double(), v.double()), (u.double(), None)
    return forms


def projection_kinds(glog) -> dict[str, str]:
    """``{parameter name: projection kind}`` as an open logger chose them."""
    return {name: proj.kind for t in glog.trackers for name, proj in zip(t.plan.param_names, t.projectors, strict=True)}


def _per_example(u, v):
    """``[n, rows, cols]`` per-example matrices (a bias: ``[n, rows, 1]``)."""
    return u.sum(1)[..., None] if v is None else torch.bmm(u.transpose(1, 2), v)


def _tensorsketch_q(m, u=None, v=None):
    """``[n]`` ``Q = ‖MᵀM‖_F² − Σ_i ‖M_i·‖⁴ − Σ_j ‖M_·j‖⁴ + ‖M‖₄⁴`` of each matrix ``m`` ``[n, rows, cols]``; the first
    term from the factors ``M = Σ_t u_t v_tᵀ`` (``tr((UUᵀ)(VVᵀ)(UUᵀ)(VVᵀ))``) when they have fewer positions than
    ``M`` has rows and columns."""
    sq = m.square()
    rest = sq.square().sum((1, 2)) - sq.sum(2).square().sum(1) - sq.sum(1).square().sum(1)
    if u is not None and v is not None and u.shape[1] < min(m.shape[1:]):
        ab = torch.bmm(torch.bmm(u, u.transpose(1, 2)), torch.bmm(v, v.transpose(1, 2)))
        return (ab * ab.transpose(1, 2)).sum((1, 2)) + rest
    small = torch.bmm(m, m.transpose(1, 2)) if m.shape[1] <= m.shape[2] else torch.bmm(m.transpose(1, 2), m)
    return small.square().sum((1, 2)) + rest


def _difference_distribution(width, k):
    """``[k]`` distribution of ``h(a) − h(b) mod k`` for two distinct entries of a side of ``width`` entries.

    The buckets are balanced (sketch version 7): bucket ``b`` holds ``c_b`` entries, the counts of ``range(width)``
    taken ``mod k`` (at most one each when ``width ≤ k``: injective), the entries assigned uniformly and the buckets'
    labels uniformly permuted. Two distinct entries share a bucket with probability ``Σ_b c_b(c_b − 1) /
    (width·(width − 1))``; otherwise their difference is uniform over the ``k − 1`` other residues.
    """
    counts = np.bincount(np.arange(width) % k, minlength=k).astype(np.float64)
    same = float((counts * (counts - 1)).sum() / (width * (width - 1))) if width > 1 else 0.0
    pi = np.full(k, (1 - same) / (k - 1))
    pi[0] = same
    return pi


def tensorsketch_pair_probabilities(rows, cols, k):
    """Collision probabilities of one TensorSketch (bucket ``(h₁(i) + h₂(j)) mod k``) of a ``rows × cols`` matrix,
    from the two sides' difference distributions ``π₁``, ``π₂`` (:func:`_difference_distribution`):

    * ``same_row``: two entries of one row collide iff their column buckets are equal, ``π₂(0)``;
    * ``same_col``: ``π₁(0)``;
    * ``apart``: entries in different rows and columns collide iff ``d₁ + d₂ ≡ 0``, ``Σ_x π₁(x)π₂(−x)``;
    * ``diagonals``: both diagonals of a 2×2 sub-matrix collide iff ``d₁ ≡ −d₂`` and ``d₁ ≡ d₂``, i.e.
      ``d₁ ≡ d₂`` with ``2d₁ ≡ 0``: ``Σ_{2x ≡ 0} π₁(x)π₂(x)``.
    """
    p1, p2 = _difference_distribution(rows, k), _difference_distribution(cols, k)
    x = np.arange(k)
    half = (2 * x) % k == 0
    return {"same_row": p2[0], "same_col": p1[0], "apart": float(p1 @ p2[(-x) % k]),
            "diagonals": float((p1 * p2)[half].sum())}


def sketch_variance(m, k, kind, blocks=None, u=None, v=None):
    """``[n]`` exact variance over seeds of ‖s‖²/‖M‖² − 1 for each matrix ``m`` ``[n, rows, cols]`` (float64).

    CountSketch (independent bucket and sign per entry): 0 when placed injectively (at most ``k`` entries), otherwise
    ``(2/k)(‖M‖⁴ − ‖M‖₄⁴)/‖M‖⁴`` (two entries collide with probability 1/k). TensorSketch mean of ``blocks`` blocks
    (default: as the logger averages for the shape, :func:`~gradcoh.logger.sketch.tensorsketch_blocks`; bucket
    ``(h₁(i) + h₂(j)) mod k``, sign ``σ₁(i)σ₂(j)``, a side of at most ``k`` entries hashed injectively, a longer
    one balanced, the blocks'
    sum over √B): ``‖s‖² − ‖M‖² = Σ_{e≠e'} σσ' x x' [e, e' collide]``, whose square's expectation keeps the
    products of four entries whose signs cancel (every row and every column an even number of times): a pair with
    itself, ``2·Σ_{e≠e'} x²x'²·P(collide)`` split by :func:`tensorsketch_pair_probabilities` into one row (``R``),
    one column (``C``) and apart (``D``); the same pair of columns in another row (both pairs collide iff the
    columns do), likewise of rows; and the two diagonals of a 2×2 sub-matrix; these three weigh the same ``Q``
    (:func:`_tensorsketch_q`). The cross terms between blocks add ``(2/k)(B − 1)/B`` (every bucket uniform).
    Derived in :data:`gradcoh.logger.sketch.TENSORSKETCH_BLOCKS`; checked against sampling in
    tests/logger/test_sketch_variance.py. ``u``, ``v``: the factors of ``m``, if any.
    """
    sq = m.square()
    n2, n4 = sq.sum((1, 2)), sq.square().sum((1, 2))
    rows, cols = m.shape[1:]
    if kind == "countsketch" and rows * cols <= k:
        return torch.zeros_like(n2)
    if kind == "countsketch":
        return 2 / k * (n2.square() - n4) / n2.square()
    blocks = tensorsketch_blocks((rows, cols), k) if blocks is None else blocks
    p = tensorsketch_pair_probabilities(rows, cols, k)
    in_rows = sq.sum(2).square().sum(1) - n4  # R
    in_cols = sq.sum(1).square().sum(1) - n4  # C
    apart = n2.square() - n4 - in_rows - in_cols  # D
    pairs = p["same_row"] * in_rows + p["same_col"] * in_cols + p["apart"] * apart
    quads = (p["same_row"] + p["same_col"] + p["diagonals"]) * _tensorsketch_q(m, u, v)
    one = 2 * (pairs + quads) / n2.square()
    return one / blocks + 2 / k * (blocks - 1) / blocks


class LayerSketches:
    """One layer's per-example gradients and their exact norms, sketched with any seed as the logger would: the
    sum over its parameters of each parameter's own projection (kind as the logger chose it, hashed by name)."""

    def __init__(self, forms, names, kinds, k):
        self.names, self.kinds, self.k = names, kinds, k
        mats = {name: _per_example(*forms[name]) for name in names}
        self.views = {name: tuple(m.shape[1:]) for name, m in mats.items()}
        self.sq = sum(m.square().sum((1, 2)) for m in mats.values())  # ‖gᵢ‖² [n]
        self.sum_sq = sum(m.sum(0).square().sum() for m in mats.values())  # ‖Σᵢ gᵢ‖²
        # the cheaper route of each projection (all routes agree to rounding: test_factored_and_dense_paths_agree):
        # the TensorSketch mean from the factors (the batch gradient: the examples as positions), CountSketch dense
        self.per, self.batch = {}, {}
        for name in names:
            u, v = forms[name]
            if kinds[name] == "tensorsketch" and v is not None:
                self.per[name] = ("factored", (u, v))
                self.batch[name] = ("factored", (u.reshape(1, -1, u.shape[-1]), v.reshape(1, -1, v.shape[-1])))
            else:
                self.per[name] = ("dense", (mats[name],))
                self.batch[name] = ("dense", (mats[name].sum(0, keepdim=True),))
        self._mats, self._forms = mats, {name: forms[name] for name in names}

    def variance(self, batch=False):
        """``[n]`` exact variance over seeds of each example's ‖s‖²/‖g‖² − 1 (``batch``: ``[1]``, the batch sum's).

        The parameters' projections are independent and unbiased with ``E[s sᵀ] = (‖M‖²/k)·I``, so the layer's
        variance is ``Σ_p V_p‖M_p‖⁴ + (2/k)·((Σ_p ‖M_p‖²)² − Σ_p ‖M_p‖⁴)`` over ``(Σ_p ‖M_p‖²)²``, each
        parameter's ``V_p`` from :func:`sketch_variance`.
        """
        k, own, norms = self.k, 0, []
        for name in self.names:
            m, (u, v) = self._mats[name], self._forms[name]
            if batch:
                m = m.sum(0, keepdim=True)
                u, v = u.reshape(1, -1, u.shape[-1]), None if v is None else v.reshape(1, -1, v.shape[-1])
            n2 = m.square().sum((1, 2))
            own = own + sketch_variance(m, k, self.kinds[name], u=u, v=v) * n2.square()
            norms.append(n2)
        total = sum(norms)
        return (own + 2 / k * (total.square() - sum(n.square() for n in norms))) / total.square()

    def sketch(self, seed, batch=False):
        """``[n, k]`` per-example sketches (``batch``: ``[1, k]``, the sketch of the batch gradient)."""
        out = 0
        for name in self.names:
            p = Projection.create(seed, name, self.views[name], self.k, self.kinds[name])
            route, args = (self.batch if batch else self.per)[name]
            out = out + getattr(p, route)(*args)
        return out
