"""Sketches: linearity, unbiasedness, accuracy per dimension, determinism, path independence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from gradcoh.logger.grads import Dense, Factored, MatrixView
from gradcoh.logger.layers import default_rules, functional_rule
from gradcoh.logger.sketch import KINDS, SKETCH_VERSION, Projection, sketch_hashes, tensorsketch_blocks
from oracle import (
    LayerSketches,
    hooked_factors,
    layer_matrix,
    layer_params,
    open_logged,
    per_example_grads_vmap,
    sketch_variance,
)
from tolerance import PRODUCT, assert_close, assert_sketch_sum, bound, chain_length, dot_scale, model_size
from torch import nn


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def log_sketches(model, x, y, path, k, seed=0, reduction="mean"):
    with GradientLogger(model, path, sketch_dim=k, seed=seed, sketch_dtype="float32",
                        loss_reduction=reduction) as glog:
        with glog.record(0):
            per = ce(model(x), y)
            (per.sum() if reduction == "sum" else per.mean()).backward()
        projected = {name: v.numpy() for name, v in glog.project_grad().items()}
    ds = open_logged(path, "batch")
    return ds, projected


def bn_train_cnn():
    """Train-mode BatchNorm: per-example values are contributions that must still sum to the batch gradient."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10)).train()


@pytest.mark.parametrize("make", [small_cnn, bn_train_cnn], ids=["cnn", "batchnorm_train"])
def test_linearity_sum_of_sketches_is_projected_batch_gradient(make, tmp_path):
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    ds, projected = log_sketches(model, x, y, tmp_path / "s.zarr", k=128, reduction="sum")
    n = chain_length(model, positions=16 * 16) + model_size(model)
    for i, name in enumerate(ds.layer.values):
        assert_sketch_sum(ds.sketch.values[0, :, i], projected[str(name)], n=n, err_msg=str(name))


def sketch_cnn():  # the CNN: 3 conv + 2 linear on 32×32×3
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, 10))


def sketch_mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@pytest.mark.parametrize("make,shape", [(sketch_cnn, (3, 32, 32)), (sketch_mlp, (64,))], ids=["cnn", "mlp"])
def test_per_layer_sd_within_jl_bound_at_k1024(make, shape, tmp_path):
    """Per layer, the mean square of ‖s‖²/‖g‖² − 1 over seeds is within the exact variance of the layer's projections
    (:meth:`oracle.LayerSketches.variance`) plus 4 standard errors of the sample, and that variance is within
    (1.25·√(2/k))², per example and for the batch sum (a bias raises the mean square as well as a spread).

    Batch 64, k = 1024, two batches (at random init and after 30 SGD steps). The logger runs once per batch
    (seed 0); its stored sketches are checked to be the sum over each layer's parameters of that parameter's
    projection (the kind the logger chose, hashed by name) of the per-example gradient that plain autograd hooks
    give, and the statistics over 20 seeds per example and 100 seeds for the batch sum come from those
    projections (the store adds nothing random; version 2 sketches, one TensorSketch per parameter, measured up to
    1.6·√(2/k) here).

    The TensorSketch mean of 4 blocks has up to 1.5·(2/k) on rank-one gradients (a Linear layer at T = 1): sd
    1.225·√(2/k), too close to the bound for sampling alone, hence the exact variance. Sampling tolerance: seeds are
    independent, the examples under one seed are not (their errors correlate like cos²(gᵢ, gⱼ)), so the standard
    error is that of the 40 per-seed means (20 seeds × 2 batches; the two batches' different variances only
    inflate it), and for the batch sum that of the 200 squared errors; z = 4 (P < 3·10⁻⁵ per layer).
    """
    k, seeds, batch_seeds = 1024, 20, 100
    torch.manual_seed(0)
    model = make()
    per, total, want_per, want_total = {}, {}, {}, {}
    for phase in range(2):
        x, y = torch.randn(64, *shape), torch.randint(0, 10, (64,))
        if phase:  # after training on a fixed batch, gradients align and shrink
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for _ in range(30):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            model.zero_grad()
        with GradientLogger(model, tmp_path / f"s{phase}.zarr", sketch_dim=k, seed=0, sketch_dtype="float32") as glog:
            with glog.record(0):
                ce(model(x), y).mean().backward()
            kinds = {name: proj.kind for t in glog.trackers
                     for name, proj in zip(t.plan.param_names, t.projectors, strict=True)}
        model.zero_grad()
        ds = open_logged(tmp_path / f"s{phase}.zarr", "batch")
        forms = hooked_factors(model, ce, x, y)
        n = chain_length(model, positions=int(np.prod(shape[1:]))) + model_size(model)
        for i, (name, params) in enumerate(layer_params(ds).items()):
            layer = LayerSketches(forms, params, kinds, k)
            stored = layer.sketch(0).numpy()
            assert_close(ds.sketch.values[0, :, i], stored, n=n, scale=np.linalg.norm(stored, axis=-1, keepdims=True),
                         err_msg=f"stored sketch of {name}")
            assert_close(ds.sq_norm.values[0, :, i], layer.sq.numpy(), n=n, kappa=PRODUCT, err_msg=f"sq_norm {name}")
            per.setdefault(name, []).extend(
                (layer.sketch(seed).square().sum(1) / layer.sq - 1).square().mean().item() for seed in range(seeds))
            total.setdefault(name, []).extend(
                (float(layer.sketch(seed, batch=True).square().sum() / layer.sum_sq) - 1) ** 2
                for seed in range(batch_seeds))
            want_per.setdefault(name, []).append(layer.variance())
            want_total.setdefault(name, []).append(float(layer.variance(batch=True)[0]))
    bound = (1.25 * np.sqrt(2 / k)) ** 2
    for name in per:
        exact = torch.cat(want_per[name])
        assert float(exact.max()) <= bound, (name, float(exact.max()) / (2 / k))
        assert max(want_total[name]) <= bound, (name, max(want_total[name]) / (2 / k))
        got, got_total = np.array(per[name]), np.array(total[name])
        se, se_total = got.std() / np.sqrt(got.size), got_total.std() / np.sqrt(got_total.size)
        assert got.mean() <= float(exact.mean()) + 4 * se, (name, got.mean() / (2 / k), float(exact.mean()) / (2 / k))
        assert got_total.mean() <= np.mean(want_total[name]) + 4 * se_total, (
            name, got_total.mean() / (2 / k), np.mean(want_total[name]) / (2 / k))


@pytest.mark.parametrize("r,c", [(6, 5), (20, 5), (20, 18)], ids=["both_injective", "cols_injective", "neither"])
@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_inner_products_over_seeds(kind, r, c):
    """E_P ⟨s_i, s_j⟩ = ⟨g_i, g_j⟩: average over 400 seeds of a factored layer gradient, for both projections (the
    TensorSketch mean with 1, 2 and 4 blocks at k = 16)."""
    torch.manual_seed(2)
    n, t, k = 3, 4, 16
    u, v = torch.randn(n, t, r), torch.randn(n, t, c)
    g = torch.bmm(u.transpose(1, 2), v).reshape(n, -1)
    exact = (g @ g.T).numpy()
    acc = np.zeros((n, n))
    seeds = 400
    for seed in range(seeds):
        p = Projection.create(seed, "layer", (r, c), k, kind)
        s = Factored(u, v).sketch(p)
        acc += (s @ s.T).numpy()
    est = acc / seeds
    # Each entry's standard error is about sqrt(2/k)·‖g_i‖‖g_j‖/sqrt(seeds); allow 4 of them.
    norms = np.sqrt(np.diag(exact))
    tol = 4 * np.sqrt(2 / k) * np.outer(norms, norms) / np.sqrt(seeds)
    assert np.all(np.abs(est - exact) <= tol), (est, exact)


def test_small_parameter_countsketch_is_exact():
    """A parameter with at most k entries is placed injectively: its sketch has exactly its norm and inner products."""
    torch.manual_seed(2)
    m = torch.randn(5, 6, 7, dtype=torch.float64)
    p = Projection.create(0, "w", (6, 7), 64, "countsketch")
    s = p.dense(m)
    flat = m.reshape(5, -1)
    norms = np.linalg.norm(flat, axis=1)  # float64 inner products of 42 entries, against ‖a‖‖b‖
    assert_close(s @ s.T, flat @ flat.T, n=flat.shape[1], kappa=PRODUCT, dtype="float64", scale=dot_scale(norms, norms))


@pytest.mark.parametrize("k", [32, 8, 4], ids=["both_injective", "rows_injective", "neither"])
@pytest.mark.parametrize("kind", KINDS)
def test_factored_and_dense_paths_agree(kind, k):
    """Every route of one projection gives the materialised route's sketch, for each number of TensorSketch blocks
    (a 7 × 9 view: B = 1 at k = 32, 2 at k = 8, 4 at k = 4)."""
    torch.manual_seed(3)
    p = Projection.create(0, "x", (7, 9), k, kind)
    u, v = torch.randn(4, 5, 7), torch.randn(4, 5, 9)
    n = 2 * (5 + 7 * 9)  # two float32 routes: 5 positions, then a projection of 7·9 entries, each
    for form in (Factored(u, v), Factored(u, v[..., :8], bias=True),
                 Factored(None, v, rows_index=torch.randint(0, 7, (4, 5)), n_rows=7)):
        want = np.asarray(form.materialise().sketch(p), dtype=np.float64)
        assert_close(form.sketch(p), want, n=n, scale=np.linalg.norm(want, axis=-1, keepdims=True), err_msg=kind)


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(5, 4), torch.randn(3, 5)),
    (nn.Conv2d(2, 3, 3, padding=1), torch.randn(3, 2, 5, 5)),
    (nn.LayerNorm(6), torch.randn(3, 2, 6)),
], ids=["linear", "conv2d", "layernorm"])
@pytest.mark.parametrize("kind", KINDS)
def test_rule_path_equals_fallback_path(layer, x, kind):
    """The same layer sketched through its rule and through the torch.func fallback gives the same sketch."""
    torch.manual_seed(4)
    out = layer(x)
    go = torch.randn_like(out)
    rule = default_rules().lookup(layer)
    view = MatrixView.of([tuple(p.shape) for p in layer.parameters()])
    p = Projection.create(0, "l", (view.rows, view.cols), 32, kind)
    a = rule(layer, (x.detach(),), {}, (go,))
    b = functional_rule(layer, (x.detach(),), {}, (go,))
    assert isinstance(b, Dense)
    n = 2 * (x[0].numel() + view.rows * view.cols)  # two float32 routes over the positions and the projection
    want = np.asarray(b.sketch(p), dtype=np.float64)
    assert_close(a.sketch(p), want, n=n, scale=np.linalg.norm(want, axis=-1, keepdims=True), err_msg="sketch")
    assert_close(a.sq_norms(), b.sq_norms(), n=n, kappa=PRODUCT, err_msg="sq_norms")


# sketch_hashes(7, "features.0", (12, 28), 256, "tensorsketch") and (..., 512, "countsketch"): hash version 3, sketch
# version 6 and 7 (both sides at most k: one block, each side a permutation's first entries; the CountSketch as
# before); (300, 28) at k = 256, version 7: one block, the rows balanced (one or two per bucket), the columns
# injective
PINNED_ROW_HASH = [111, 237, 158, 199, 149, 85]
PINNED_COL_SIGN = [1.0, -1.0, -1.0, -1.0, -1.0, -1.0]
PINNED_COUNT_HASH = [209, 254, 500, 390, 249, 418]
PINNED_TALL_ROW_HASH = [3, 100, 37, 189, 169, 236]
PINNED_TALL_COL_HASH = [203, 224, 7, 56, 194, 205]


def test_determinism_across_processes_and_seeds(tmp_path):
    code = ("from gradcoh.logger.sketch import sketch_hashes; import numpy as np; "
            "h = sketch_hashes(7, 'features.0', (12, 28), 256, 'tensorsketch'); "
            "print(int(np.abs(h['row_hash']).sum() * 7 + (h['col_hash'] @ np.arange(28)).sum() + h['row_sign'].sum()))")
    a = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    h = sketch_hashes(7, "features.0", (12, 28), 256, "tensorsketch")
    local = int(np.abs(h["row_hash"]).sum() * 7 + (h["col_hash"] @ np.arange(28)).sum() + h["row_sign"].sum())
    assert int(a) == local
    # pinned: a change of the hashing would silently change the projection of existing stores (bump the version:
    # these pins are version 7's, and an append to a store of another version is refused)
    assert SKETCH_VERSION == 7
    assert h["row_hash"][0, :6].tolist() == PINNED_ROW_HASH and h["col_sign"][0, :6].tolist() == PINNED_COL_SIGN
    assert h["row_hash"].shape == (1, 12) and h["col_hash"].shape == (1, 28)
    assert len(np.unique(h["row_hash"])) == 12 and len(np.unique(h["col_hash"])) == 28  # injective sides (≤ k)
    tall = sketch_hashes(7, "features.0", (300, 28), 256, "tensorsketch")
    assert tall["row_hash"].shape == (1, 300) and tall["col_sign"].shape == (1, 28)
    assert tall["row_hash"][0, :6].tolist() == PINNED_TALL_ROW_HASH
    assert tall["col_hash"][0, :6].tolist() == PINNED_TALL_COL_HASH
    assert all(len(np.unique(c)) == 28 for c in tall["col_hash"])
    assert sorted(np.bincount(tall["row_hash"][0], minlength=256).tolist()) == [1] * 212 + [2] * 44  # balanced
    wide = sketch_hashes(7, "features.0", (1280, 320), 256, "tensorsketch")
    assert wide["row_hash"].shape == (4, 1280)
    assert all(set(np.bincount(h, minlength=256).tolist()) == {5} for h in wide["row_hash"])
    assert all(set(np.bincount(h, minlength=256).tolist()) == {1, 2} for h in wide["col_hash"])
    count = sketch_hashes(7, "features.0", (12, 28), 512, "countsketch")
    assert count["hash"].reshape(-1)[:6].tolist() == PINNED_COUNT_HASH
    assert len(np.unique(count["hash"])) == 12 * 28  # injective when rows·cols ≤ k
    other = sketch_hashes(8, "features.0", (12, 28), 256, "tensorsketch")
    assert not np.array_equal(h["col_hash"], other["col_hash"])
    renamed = sketch_hashes(7, "features.1", (12, 28), 256, "tensorsketch")
    assert not np.array_equal(h["col_hash"], renamed["col_hash"])
    with pytest.raises(ValueError, match="kind must be one of"):
        sketch_hashes(7, "features.0", (12, 28), 256, "gaussian")


def test_same_seed_same_sketches_different_seed_different(tmp_path):
    torch.manual_seed(5)
    model = mlp()
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    a, _ = log_sketches(model, x, y, tmp_path / "a.zarr", k=32, seed=1)
    b, _ = log_sketches(model, x, y, tmp_path / "b.zarr", k=32, seed=1)
    c, _ = log_sketches(model, x, y, tmp_path / "c.zarr", k=32, seed=2)
    np.testing.assert_array_equal(a.sketch.values, b.sketch.values)
    assert not np.allclose(a.sketch.values, c.sketch.values)


def numpy_projection(seed, name, shape, k, kind):
    """The ``[k, rows·cols]`` matrix of a parameter's projection, built in NumPy from its hashes alone."""
    rows = shape[0]
    cols = int(np.prod(shape)) // rows
    h = sketch_hashes(seed, name, (rows, cols), k, kind)
    out = np.zeros((k, rows * cols))
    if kind == "countsketch":
        out[h["hash"].reshape(-1), np.arange(rows * cols)] = h["sign"].reshape(-1)
        return out
    blocks = h["row_hash"].shape[0]
    for b in range(blocks):
        bucket = (h["row_hash"][b][:, None] + h["col_hash"][b][None, :]) % k
        sign = h["row_sign"][b][:, None] * h["col_sign"][b][None, :]
        np.add.at(out, (bucket.reshape(-1), np.arange(rows * cols)), sign.reshape(-1) / np.sqrt(blocks))
    return out


@pytest.mark.parametrize("make,shape", [(small_cnn, (3, 16, 16)), (mlp, (64,))], ids=["cnn", "mlp"])
def test_sketch_of_per_example_gradient_equals_numpy_projection(make, shape, tmp_path):
    """Stored sketches equal the sum over the layer's parameters of the NumPy-built projection of the oracle's
    per-example gradient of each parameter (natural view ``(shape[0], numel / shape[0])``, hashed by name), with
    the projection kind the logger chose for each parameter (the MLP gets block TensorSketches)."""
    torch.manual_seed(6)
    model = make()
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    k = 64
    with GradientLogger(model, tmp_path / "s.zarr", sketch_dim=k, sketch_dtype="float32") as glog:
        with glog.record(0):
            ce(model(x), y).mean().backward()
        kinds = {name: proj.kind for t in glog.trackers
                 for name, proj in zip(t.plan.param_names, t.projectors, strict=True)}
    ds = open_logged(tmp_path / "s.zarr", "batch")
    assert "tensorsketch" in kinds.values() or make is small_cnn
    grads = per_example_grads_vmap(model, ce, x, y)
    for i, names in enumerate(layer_params(ds).values()):
        expected = 0
        for name in names:
            g = grads[name].double().reshape(4, -1).numpy()  # stored per example: the mean is divided back
            expected = expected + g @ numpy_projection(0, name, tuple(grads[name].shape[1:]), k, kinds[name]).T
        # the float32 chain of the model, then the projection of the layer's entries; each example's coordinates
        # against the size of its sketch
        assert_close(ds.sketch.values[0, :, i], expected, n=chain_length(model, x[0].numel()) + model_size(model),
                     scale=np.linalg.norm(expected, axis=-1, keepdims=True), err_msg=str(names))
        assert layer_matrix(grads, names).shape[1] == int(ds.layer_size.values[i])


def _routes_on(device, kind):
    """Every route of one projection on ``device``: dense (two column blocks), factored, factored with a bias
    column, indexed; float32 inputs seeded on the CPU."""
    gen = torch.Generator().manual_seed(12)
    u, v = torch.randn(3, 5, 10, generator=gen), torch.randn(3, 5, 20, generator=gen)
    m, idx = torch.randn(3, 10, 20, generator=gen), torch.randint(0, 10, (3, 5), generator=gen)
    p = Projection.create(3, "fc", (10, 20), 64, kind, device)
    u, v, m, idx = (x.to(device) for x in (u, v, m, idx))
    return {"dense": p.dense(m[..., :12]) + p.dense(m[..., 12:], col_offset=12), "factored": p.factored(u, v),
            "bias": p.factored(u, v[..., :19], bias=True), "indexed": p.indexed(idx, v)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_routes_equal_cpu(kind):
    """Every route of every projection gives on CUDA what it gives on the CPU (hashes made on the CPU, float32:
    two devices' sums of at most 5·(10 + 20) products per bucket, against each example's sketch norm)."""
    cpu, gpu = _routes_on("cpu", kind), _routes_on("cuda", kind)
    for route, value in cpu.items():
        want = value.double().numpy()
        assert_close(gpu[route].cpu(), want, n=2 * 5 * 30, scale=np.linalg.norm(want, axis=-1, keepdims=True),
                     err_msg=route)


# --- every route of every projection class --------------------------------------------------------------------
def _route_forms(route, n, t, rows, cols, gen):
    """Per-example gradients of one parameter in the form ``route`` (as a rule would give them), the batch gradient
    (materialised: every route gives its sketch to rounding), and the per-example gradients as matrices.

    The column factors have mean 1 (as inputs after a ReLU do), so each gradient's entries share signs along its
    rows: a projection whose signs were not balanced would be biased on them (on mean-zero entries it would not).
    """
    v = torch.randn(n, t, cols, generator=gen, dtype=torch.float64) + 1
    if route == "indexed":
        idx = torch.randint(0, rows, (n, t), generator=gen)
        form = Factored(None, v, rows_index=idx, n_rows=rows)
        whole = Factored(None, v.reshape(1, n * t, cols), rows_index=idx.reshape(1, n * t), n_rows=rows)
    else:
        u = torch.randn(n, t, rows, generator=gen, dtype=torch.float64)
        form, whole = Factored(u, v), Factored(u.reshape(1, n * t, rows), v.reshape(1, n * t, cols))
    dense = form.materialise()
    return (dense if route == "dense" else form), whole.materialise(), dense.m.reshape(n, -1)


# (kind, k, TensorSketch blocks) for a 24 × 40 view: both sides injective at k = 256, the rows at k = 24 (the
# columns balanced, 1.67·k: two blocks; at k = 32 one), neither at k = 16
ROUTE_CASES = [("countsketch", 256, None), ("tensorsketch", 256, 1), ("tensorsketch", 24, 2), ("tensorsketch", 16, 4)]


@pytest.mark.parametrize("kind,k,blocks", ROUTE_CASES, ids=["countsketch", "ts_one_block", "ts_two", "ts_four"])
@pytest.mark.parametrize("route", ["dense", "factored", "indexed"])
@pytest.mark.parametrize("positions", [1, 4, 32])
def test_every_route_within_jl_bound(kind, k, blocks, route, positions):
    """Per route, the mean square of ‖s‖²/‖g‖² − 1 over seeds and examples is within the projection's exact variance
    (:func:`oracle.sketch_variance`) plus 4 standard errors of the sample, and that variance within (1.25·√(2/k))²,
    per example and for the batch sum (a bias raises the mean square as well as a spread); the mean is 0 within 4
    standard errors.

    Rank-one per-example gradients (T = 1) are the TensorSketch mean's worst case, up to 1.5·(2/k) with 4 blocks or
    with 2 and one injective side (sd 1.225·√(2/k)): too close to the bound for sampling alone, hence the exact
    variance. Sampling tolerance:
    seeds are independent, the 16 examples under one seed are not (their errors correlate like cos²(gᵢ, gⱼ)), so
    the standard errors are those of the 60 per-seed means (of the squared errors, and of the errors), and for the
    batch sum (one sample per seed) that of the 400 squared errors; z = 4 (P < 3·10⁻⁵ per case).
    """
    n, rows, cols, seeds, batch_seeds = 16, 24, 40, 60, 400
    assert kind == "countsketch" or tensorsketch_blocks((rows, cols), k) == blocks
    gen = torch.Generator().manual_seed(positions)
    form, whole, flat = _route_forms(route, n, positions, rows, cols, gen)
    norms, total = flat.square().sum(1), flat.sum(0).square().sum()
    per = np.stack([(form.sketch(Projection.create(seed, "w", (rows, cols), k, kind)).square().sum(1) / norms
                     - 1).numpy() for seed in range(seeds)])  # [seeds, n]
    batch = np.array([float(whole.sketch(Projection.create(seed, "w", (rows, cols), k, kind)).square().sum() / total
                            - 1) for seed in range(batch_seeds)])
    promised = (1.25 * np.sqrt(2 / k)) ** 2
    exact = sketch_variance(flat.reshape(n, rows, cols), k, kind)
    exact_batch = float(sketch_variance(flat.sum(0).reshape(1, rows, cols), k, kind)[0])
    assert float(exact.max()) <= promised and exact_batch <= promised, (exact.max() / (2 / k), exact_batch / (2 / k))
    # float64 rounding of each ratio (routes over ≤ 16·32 positions and the view's entries, both norms): it alone
    # remains where the sketch is an isometry (one row, injective columns: the indexed route at T = 1)
    rounding = bound(2 * (n * positions + rows * cols), dtype="float64")
    per_seed = (per**2).mean(1)
    assert per_seed.mean() <= float(exact.mean().clamp(min=0)) + 4 * per_seed.std() / np.sqrt(seeds) + rounding**2, (
        per_seed.mean() / (2 / k), float(exact.mean()) / (2 / k))
    assert abs(per.mean()) <= 4 * per.mean(1).std() / np.sqrt(seeds) + rounding, per.mean()
    assert np.mean(batch**2) <= max(exact_batch, 0) + 4 * np.std(batch**2) / np.sqrt(batch_seeds) + rounding**2, (
        np.mean(batch**2) / (2 / k), exact_batch / (2 / k))


@pytest.mark.parametrize("kind", KINDS)
def test_routes_of_one_projection_agree_on_bias_and_offsets(kind):
    """``dense`` over column blocks (weight | bias) equals the factored route with an implicit ones column."""
    torch.manual_seed(9)
    u, v = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    p = Projection.create(1, "lin", (6, 8), 32, kind)
    whole = torch.cat([torch.bmm(u.transpose(1, 2), v), u.sum(1).unsqueeze(2)], dim=2)
    blocks = p.dense(whole[..., :7]) + p.dense(whole[..., 7:], col_offset=7)
    want = p.dense(whole).numpy()
    size = np.linalg.norm(want, axis=-1, keepdims=True)  # float64 routes over 5 positions and 6·8 entries, each
    assert_close(blocks, want, n=2 * 6 * 8, dtype="float64", scale=size, err_msg="column blocks")
    assert_close(p.factored(u, v, bias=True), want, n=2 * (5 + 6 * 8), dtype="float64", scale=size, err_msg="factored")


@pytest.mark.parametrize("cache", [2**18, 200, 64], ids=["all_blocks", "examples_by_two", "block_by_block"])
@pytest.mark.parametrize("view", [(9, 5), (5, 11), (12, 12), (6, 7)],
                         ids=["rows_folded", "cols_folded", "both_folded", "neither_folded"])
def test_tensorsketch_factored_code_paths_equal_dense(view, cache, monkeypatch):
    """Every code path of the TensorSketch mean's factored route gives its dense route's sketch: all blocks counted
    at once, or block by block over two examples at a time (a mix-up of examples within a chunk fails only there) or
    over one example and a few positions at a time, each side counted into k buckets with its signs
    multiplied in (narrower than k) or into 2k signed buckets folded (k = 8 here), with and without a bias column;
    B = 1 (6 × 7: both sides injective; 9 × 5: the rows balanced), 2 (5 × 11) and 4 (12 × 12)."""
    import gradcoh.logger.sketch as sketch_module

    monkeypatch.setattr(sketch_module, "_CACHE_ELEMENTS", cache)
    torch.manual_seed(17)
    rows, cols = view
    u, v = torch.randn(4, 5, rows, dtype=torch.float64), torch.randn(4, 5, cols - 1, dtype=torch.float64)
    p = Projection.create(3, "w", view, 8, "tensorsketch")
    whole = torch.cat([torch.bmm(u.transpose(1, 2), v), u.sum(1).unsqueeze(2)], dim=2)
    want = p.dense(whole).numpy()
    size = np.linalg.norm(want, axis=-1, keepdims=True)  # float64 routes over 5 positions and rows·cols entries
    assert_close(p.factored(u, v, bias=True), want, n=2 * (5 + rows * cols), dtype="float64", scale=size)
    full = torch.cat([v, torch.randn(4, 5, 1, dtype=torch.float64)], dim=2)
    want = p.dense(torch.bmm(u.transpose(1, 2), full)).numpy()
    assert_close(p.factored(u, full), want, n=2 * (5 + rows * cols), dtype="float64",
                 scale=np.linalg.norm(want, axis=-1, keepdims=True))


@pytest.mark.parametrize("cache", [2**18, 64], ids=["all_blocks", "block_by_block"])
@pytest.mark.parametrize("geometry", [
    (nn.Conv2d, 5, 7, 3, 1, 1, 1, (6, 6)),
    (nn.Conv2d, 4, 9, (3, 2), (2, 1), (1, 0), (2, 1), (9, 8)),
    (nn.Conv1d, 3, 6, 5, 2, 2, 1, (11,)),
    (nn.Conv3d, 2, 5, 2, 1, 1, 1, (3, 4, 3)),
], ids=["3x3", "dilated_strided_2d", "1d", "3d"])
def test_patches_taps_last_give_the_same_tensorsketch(geometry, cache, monkeypatch):
    """Patches formed channels-last (columns ``(tap, channel)``) are :meth:`Patches.unfold`'s columns permuted, and a
    TensorSketch mean sketches them with each column's own hash: the sketch of the natural patches, through
    ``factored_taps_last`` and through a convolution's :class:`PatchFactored` (which leaves ``v`` unformed; with a
    bias column sketched apart), for several geometries (B = 2 for the 2-D ones, 1 for the others) and both code
    paths of the factored route."""
    import gradcoh.logger.sketch as sketch_module
    from gradcoh.logger.ops.conv import Patches, PatchFactored

    monkeypatch.setattr(sketch_module, "_CACHE_ELEMENTS", cache)
    torch.manual_seed(5)
    cls, cin, cout, kernel, stride, padding, dilation, spatial = geometry
    conv = cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(3, cin, *spatial, dtype=torch.float64)
    y = conv(x)
    per_position = torch.randn_like(y).reshape(3, cout, -1).transpose(1, 2)  # the rule's layout: [n, T, C_out]
    patches = Patches(x, tuple(conv.kernel_size), tuple(conv.dilation), tuple(conv.padding), tuple(conv.stride),
                      tuple(y.shape[2:]))
    v, taps_last = patches.unfold(), patches.unfold_taps_last()
    taps = v.shape[-1] // cin
    assert taps_last.stride(-1) == 1
    assert torch.equal(taps_last.reshape(3, -1, taps, cin).transpose(2, 3).reshape(v.shape), v)
    p = Projection.create(3, "w", (cout, cin * taps + 1), 16, "tensorsketch")
    whole = torch.bmm(per_position.transpose(1, 2), v)
    want = p.dense(whole).numpy()
    n_acc = 2 * (per_position.shape[1] + cout * cin * taps)
    scale = np.linalg.norm(want, axis=-1, keepdims=True)
    assert_close(p.factored_taps_last(per_position, taps_last, cin), want, n=n_acc, dtype="float64", scale=scale)
    form = PatchFactored(per_position, bias=True, patches=patches)
    with_bias = torch.cat([whole, per_position.sum(1).unsqueeze(2)], dim=2)
    want = p.dense(with_bias).numpy()
    assert_close(form.sketch(p), want, n=n_acc, dtype="float64", scale=np.linalg.norm(want, axis=-1, keepdims=True))
    assert form._v is None
    with pytest.raises(ValueError, match="do not match"):
        p.factored_taps_last(per_position, taps_last[..., :-1], cin)


def test_choice_from_a_cost_model_of_the_shapes():
    """A TensorSketch mean where the factors are far smaller than the gradient (few positions on a large matrix),
    a CountSketch where the gradient is materialised anyway or has at most k entries; the same shapes, the same
    choice (no timing enters)."""
    from gradcoh.logger.sketch import choose_projection

    assert choose_projection((512, 4608), 256, [("factored", 4)]) == "tensorsketch"  # ResNet-18 layer4 conv
    assert choose_projection((1000, 512), 256, [("factored", 1)]) == "tensorsketch"  # classifier head
    assert choose_projection((256, 256), 256, [("factored", 128)]) == "countsketch"  # Llama q_proj, T = 128
    # a transformer MLP at T = 128: materialising for the CountSketch spares the ghost norm of the exact statistics,
    # which the TensorSketch mean's factored route leaves to pay (without it, 4 blocks would look cheaper)
    assert choose_projection((1024, 256), 256, [("factored", 128)]) == "countsketch"
    assert choose_projection((640, 160), 256, [("factored", 16)]) == "tensorsketch"  # ConvNeXt stage-3 MLP
    assert choose_projection((64, 576), 1024, [("factored", 256)]) == "countsketch"  # ResNet-18 layer1 conv
    assert choose_projection((512, 4608), 256, [("dense", 1)]) == "countsketch"
    assert choose_projection((8, 16), 256, [("factored", 1)]) == "countsketch"  # ≤ k entries: exact
    assert choose_projection((1, 4096), 256, [("factored", 1)]) == "countsketch"  # a vector
    assert choose_projection((512, 4608), 256, []) == "countsketch"


def test_blocks_from_the_shape_and_the_cost_proportional_to_them(monkeypatch):
    """1, 2 or 4 TensorSketch blocks by the shape (the fewest within version 6's worst case: one where a side is
    injective and the other balanced and at most ≈ 2k long); the TensorSketch mean's modelled cost is
    proportional to its blocks (the dense route exactly, the factored one but for its single inverse FFT), which
    moves the ConvNeXt stage-3 MLPs (640 × 160, T = 16) at k = 1024 to a one-block TensorSketch mean (4 blocks: a
    CountSketch). Transformer Linears at T ≥ 20 stay CountSketches: materialised, they supply .grad in fused mode
    "auto" and spare autograd's weight GEMM, which :func:`form_cost` credits (without it, two blocks would take a
    ViT MLP at T = 65 and the Llama MLP at T = 128, slower in whole steps)."""
    import gradcoh.logger.sketch as sk

    views = [(1280, 320), (320, 640), (640, 160), (300, 257), (256, 300), (300, 2), (256, 256), (2, 2)]
    assert [tensorsketch_blocks(v, 256) for v in views] == [4, 2, 2, 1, 1, 1, 1, 1]  # version 6: 4, 4, 2, 4, 2, 2, 1, 1
    assert tensorsketch_blocks((4, 4), 1) == 4 and tensorsketch_blocks((4, 4), 2) == 4  # one or two buckets
    u, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert Projection.create(0, "w", (4, 4), 1, "tensorsketch").factored(u, v).shape == (3, 1)
    dense = sk.TensorSketchMean.cost((640, 160), 256, ("dense", 1))
    factored = sk.TensorSketchMean.cost((640, 160), 256, ("factored", 16))
    inverse = sk.SKETCH_COSTS.fft * 256 * 8
    assert sk.choose_projection((640, 160), 1024, [("factored", 16)]) == "tensorsketch"
    assert sk.choose_projection((768, 192), 256, [("factored", 65)]) == "countsketch"  # ViT MLP, 2 blocks
    assert sk.choose_projection((256, 256), 256, [("factored", 128)]) == "countsketch"  # Llama q_proj, 1 block
    monkeypatch.setattr(sk, "tensorsketch_blocks", lambda view, dim: 4)
    assert sk.TensorSketchMean.cost((640, 160), 256, ("dense", 1)) == pytest.approx(2 * dense, rel=1e-12)
    assert sk.TensorSketchMean.cost((640, 160), 256, ("factored", 16)) - inverse == pytest.approx(
        2 * (factored - inverse), rel=1e-12)
    assert sk.choose_projection((640, 160), 1024, [("factored", 16)]) == "countsketch"


def seq_model():
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 48))


def log_seq(model, path, t, mode="create", k=64, steps=(0,)):
    with GradientLogger(model, path, sketch_dim=k, sketch_dtype="float32", mode=mode) as glog:
        for j, step in enumerate(steps):
            torch.manual_seed(100 + step)
            x = torch.randn(3, t[j] if isinstance(t, tuple) else t, 32)
            with glog.record(step):
                model(x).square().mean((1, 2)).mean().backward()
            model.zero_grad()
        kinds = {name: proj.kind for tr in glog.trackers
                 for name, proj in zip(tr.plan.param_names, tr.projectors, strict=True)}
    return kinds


def test_store_records_projections_and_append_adopts_them(tmp_path):
    """The store records each parameter's projection at the first sketched step; a resumed run adopts them even
    where its own first batch would have chosen otherwise (T = 64 instead of 1), so its sketches equal a run that
    never stopped; an append from another sketch version is refused before anything is written."""
    import zarr

    path = tmp_path / "r.zarr"
    first = log_seq(seq_model(), path, t=1)
    assert "tensorsketch" in first.values()
    stored = zarr.open_group(str(path), mode="r").attrs["gradcoh_projections"]
    assert {name: e["kind"] for name, e in stored["params"].items()} == first
    assert log_seq(seq_model(), tmp_path / "other.zarr", t=64) != first  # what T = 64 alone would choose
    resumed = log_seq(seq_model(), path, t=64, mode="append", steps=(1,))
    assert resumed == first
    straight = tmp_path / "straight.zarr"
    log_seq(seq_model(), straight, t=(1, 64), steps=(0, 1))  # one run, never stopped
    resumed_sketch = open_logged(path, "batch").sketch.values
    np.testing.assert_array_equal(resumed_sketch, open_logged(straight, "batch").sketch.values)

    root = zarr.open_group(str(path), mode="r+")
    old = dict(root.attrs["gradcoh_projections"])
    # 4: 8 TensorSketch blocks; 5: 4 blocks with independent hashes on every side; 6: long sides independent, not
    # balanced (and more blocks)
    for version in (3, 4, 5, 6):
        root.attrs["gradcoh_projections"] = {**old, "version": version}
        with pytest.raises(ValueError, match=f"sketch version {version}"):
            log_seq(seq_model(), path, t=1, mode="append", steps=(2,))
    unknown = {n: {**e, "kind": "gaussian"} for n, e in old["params"].items()}
    root.attrs["gradcoh_projections"] = {**old, "params": unknown}
    with pytest.raises(ValueError, match="cannot reproduce"):
        log_seq(seq_model(), path, t=1, mode="append", steps=(2,))
    assert int(open_logged(path, "batch").sizes["step"]) == 2


def test_projections_identical_in_two_processes(tmp_path):
    """Another process with the same model and shapes makes the same choices and the same sketches, bit for bit.

    Both processes run one torch thread: the training step's own GEMMs and FFTs round differently at one and two
    threads (2e-7 relative in these sketches), and MKL may use fewer threads than asked for on a loaded machine, so
    at two threads the bitwise comparison failed now and then under load (a projection differing would change the
    sketches at O(1))."""
    import os

    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); sys.path.insert(0, {str(here.parent)!r}); "
            "import torch; torch.set_num_threads(1); "
            "from test_sketch import log_seq, seq_model; from pathlib import Path; "
            f"print(sorted(log_seq(seq_model(), Path({str(tmp_path / 'a.zarr')!r}), t=4).items()))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = log_seq(seq_model(), tmp_path / "b.zarr", t=4)
    finally:
        torch.set_num_threads(threads)
    assert out.strip() == str(sorted(local.items()))
    np.testing.assert_array_equal(open_logged(tmp_path / "a.zarr", "batch").sketch.values,
                                  open_logged(tmp_path / "b.zarr", "batch").sketch.values)


@pytest.mark.parametrize("k", [16, 8, 6], ids=["one_block", "two_blocks", "four_blocks"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_routes_equal_unchunked(kind, k, monkeypatch):
    """With temporaries capped at 64 elements every route works through many row, example and position chunks and
    gives what it gives in one piece."""
    import gradcoh.logger.sketch as sketch_module

    torch.manual_seed(13)
    u, v = torch.randn(5, 7, 9, dtype=torch.float64), torch.randn(5, 7, 11, dtype=torch.float64)
    idx = torch.randint(0, 9, (5, 7))
    p = Projection.create(2, "c", (9, 12), k, kind)
    assert kind == "countsketch" or p.blocks == {16: 1, 8: 2, 6: 4}[k]
    m = torch.bmm(u.transpose(1, 2), v)
    whole = {"dense": p.dense(m), "factored": p.factored(u, v, bias=True), "indexed": p.indexed(idx, v)}
    monkeypatch.setattr(sketch_module, "_CHUNK_ELEMENTS", 64)
    chunked = {"dense": p.dense(m), "factored": p.factored(u, v, bias=True), "indexed": p.indexed(idx, v)}
    for route, value in whole.items():
        np.testing.assert_allclose(chunked[route], value, rtol=1e-10, atol=1e-10, err_msg=route)
