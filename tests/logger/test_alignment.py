"""Per-example alignment with the batch gradient and with a reference set, against float64 per-example oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from oracle import layer_params, open_logged, per_example_grads_loop, per_example_grads_vmap
from test_exact import LAYER_MODELS, Custom, Shared, sq_loss, target_for
from tolerance import PRODUCT, assert_close, chain_length, expected
from torch import nn


def oracle_alignment(ds, grads, ref_grads=None):
    """``(alignment [n, L], ref_alignment [n, L], ref_sq_norm [L])`` from per-example gradients (float64).

    Each carries the size of its terms (:func:`tolerance.expected`): gᵢ·G against ‖gᵢ‖·Σⱼ‖gⱼ‖, gᵢ·R̄ against
    ‖gᵢ‖·mean ‖rⱼ‖, ‖R̄‖² against (mean ‖rⱼ‖)², so that sums that cancel are measured against their terms.
    """
    al, ref, ref_sq, al_s, ref_s, ref_sq_s = [], [], [], [], [], []
    for names in layer_params(ds).values():
        g = torch.cat([grads[k].flatten(1) for k in names], 1)
        norms = g.norm(dim=1).numpy()
        al.append((g @ g.sum(0)).numpy())
        al_s.append(norms * norms.sum())
        if ref_grads is not None:
            rs = torch.cat([ref_grads[k].flatten(1) for k in names], 1)
            r, r_size = rs.mean(0), float(rs.norm(dim=1).mean())
            ref.append((g @ r).numpy())
            ref_s.append(norms * r_size)
            ref_sq.append(float(r @ r))
            ref_sq_s.append(r_size**2)
    return (expected(np.stack(al, 1), np.stack(al_s, 1)),
            expected(np.stack(ref, 1), np.stack(ref_s, 1)) if ref else None, expected(ref_sq, ref_sq_s))


def close(actual, want, model, x):
    """Within the float32 bound of ``model``'s accumulation length on inputs like ``x`` (products: κ = 2)."""
    assert_close(actual, want, n=chain_length(model, positions=x[0].numel()), kappa=PRODUCT)


def log_steps(model, path, batches, reference=None, reduction="mean", **kw):
    with GradientLogger(model, path, loss_reduction=reduction, alignment=True, reference=reference, **kw) as glog:
        for step, micro in enumerate(batches):
            with glog.record(step):
                for x, y in micro:
                    per = sq_loss(model(x), y)
                    (per.mean() if reduction == "mean" else per.sum()).backward()
            model.zero_grad()
    return open_logged(path)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", sorted(LAYER_MODELS))
def test_alignment_every_layer_rule(kind, reduction, tmp_path):
    torch.manual_seed(0)
    model, shape = LAYER_MODELS[kind]()
    x, xr = torch.randn(6, *shape), torch.randn(9, *shape)
    y, yr = target_for(model, x), target_for(model, xr)
    ds = log_steps(model, tmp_path / "s.zarr", [[(x, y)]], (xr, yr, sq_loss), reduction)
    al, ref, ref_sq = oracle_alignment(ds, per_example_grads_vmap(model, sq_loss, x, y),
                                       per_example_grads_vmap(model, sq_loss, xr, yr))
    close(ds.alignment.values[0], al, model, x)
    close(ds.ref_alignment.values[0], ref, model, x)
    close(ds.ref_sq_norm.values[0], ref_sq, model, x)
    sums = ds.alignment.values[0].sum(0)  # Σ_i g_i · G = ‖G‖²: two float32 values against each other
    assert_close(sums, ds.sum_sq_norm.values[0], n=2 * (chain_length(model, x[0].numel()) + len(x)), kappa=PRODUCT,
                 scale=al.scale.sum(0), err_msg="Σ alignment = sum_sq_norm")


def test_alignment_shared_weights_fallback_and_micro_batches(tmp_path):
    """A module called twice, the torch.func fallback, and two micro-batches (G is the sum over both)."""
    torch.manual_seed(1)
    for model, x in ((Shared(), torch.randn(7, 4)), (nn.Sequential(Custom(), nn.Linear(5, 2)), torch.randn(7, 5))):
        y = target_for(model, x)
        path = tmp_path / f"{type(model).__name__}.zarr"
        ds = log_steps(model, path, [[(x[:3], y[:3]), (x[3:], y[3:])]], (x[:4], y[:4], sq_loss), "sum")
        al, ref, _ = oracle_alignment(ds, per_example_grads_loop(model, sq_loss, x, y),
                                      per_example_grads_loop(model, sq_loss, x[:4], y[:4]))
        close(ds.alignment.values[0], al, model, x)
        close(ds.ref_alignment.values[0], ref, model, x)


class Tied(nn.Module):
    """An embedding whose weight is also the output projection (GPT-2's tied head): two forms, one parameter."""

    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.emb(ids))) @ self.emb.weight.T


def test_alignment_tied_embedding(tmp_path):
    torch.manual_seed(4)
    model = Tied()
    ids = torch.randint(0, 11, (5, 4))
    y = torch.randn(5, 4, 11)
    ds = log_steps(model, tmp_path / "s.zarr", [[(ids, y)]], (ids[:2], y[:2], sq_loss))
    al, ref, _ = oracle_alignment(ds, per_example_grads_loop(model, sq_loss, ids, y),
                                  per_example_grads_loop(model, sq_loss, ids[:2], y[:2]))
    close(ds.alignment.values[0], al, model, y)  # y: the widest tensor of one example
    close(ds.ref_alignment.values[0], ref, model, y)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def train(path, reference: bool, every: int = 2):
    """Six SGD steps of a model with BatchNorm (train mode) and dropout; logging with or without a reference."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    ref = (torch.randn(10, 1, 8, 8, generator=gen), torch.randint(0, 3, (10,), generator=gen), ce)
    torch.manual_seed(2)
    kw = {"alignment": True, "reference": ref, "reference_every": every} if reference else {}
    with GradientLogger(model, path, **kw) as glog:
        for step in range(6):
            x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
            with glog.record(step):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return model


def test_reference_leaves_training_bitwise_unchanged_and_is_reused(tmp_path):
    plain = train(tmp_path / "a.zarr", reference=False)
    logged = train(tmp_path / "b.zarr", reference=True, every=3)
    for (k, p), q in zip(plain.state_dict().items(), logged.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    ds = open_logged(tmp_path / "b.zarr")
    assert ds.ref_step.values.tolist() == [0, 0, 0, 3, 3, 3]  # recomputed once 3 steps have passed
    assert np.isfinite(ds.ref_alignment.values).all()


def test_probe_alignment_against_its_own_sum_and_reference(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    px, py = torch.randn(9, 6), torch.randint(0, 3, (9,))
    rx, ry = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with GradientLogger(model, tmp_path / "s.zarr", alignment=True, reference=(rx, ry, ce)) as glog:
        glog.probe(0, px, py, ce, batch_size=4)
    ds = open_logged(tmp_path / "s.zarr", "probe")
    al, ref, _ = oracle_alignment(ds, per_example_grads_vmap(model, ce, px, py),
                                  per_example_grads_vmap(model, ce, rx, ry))
    close(ds.alignment.values[0], al, model, px)
    close(ds.ref_alignment.values[0], ref, model, px)


def test_loss_scale_is_divided_out(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 5), torch.randn(6, 2)
    with GradientLogger(model, tmp_path / "s.zarr", alignment=True, reference=(x[:3], y[:3], sq_loss)) as glog:
        with glog.record(0) as rec:
            (sq_loss(model(x), y).mean() * 1024.0).backward()
            rec.unscale(1024.0)
    ds = open_logged(tmp_path / "s.zarr")
    al, ref, _ = oracle_alignment(ds, per_example_grads_vmap(model, sq_loss, x, y),
                                  per_example_grads_vmap(model, sq_loss, x[:3], y[:3]))
    close(ds.alignment.values[0], al, model, x)
    close(ds.ref_alignment.values[0], ref, model, x)


def test_bad_reference_and_append_mismatch_are_refused(tmp_path):
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="tuple"):
        GradientLogger(model, tmp_path / "a.zarr", reference=(x, y))
    with pytest.raises(ValueError, match="same positive number"):
        GradientLogger(model, tmp_path / "b.zarr", reference=(x, y[:2], sq_loss))
    with pytest.raises(ValueError, match="reference_every"):
        GradientLogger(model, tmp_path / "c.zarr", reference=(x, y, sq_loss), reference_every=0)
    with GradientLogger(model, tmp_path / "d.zarr", reference=(x, y, lambda o, t: sq_loss(o, t).sum())) as glog:
        with pytest.raises(ValueError, match="one loss per example"), glog.record(0):
            sq_loss(model(x), y).mean().backward()
    with GradientLogger(model, tmp_path / "e.zarr") as glog:
        with glog.record(0):
            sq_loss(model(x), y).mean().backward()
    with pytest.raises(Exception, match="alignment"):
        GradientLogger(model, tmp_path / "e.zarr", mode="append", alignment=True)


def _mlp():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_mean_reduction_with_unequal_micro_batches(tmp_path):
    model = _mlp()
    x = torch.randn(7, 6)
    y = target_for(model, x)
    ds = log_steps(model, tmp_path / "s.zarr", [[(x[:2], y[:2]), (x[2:], y[2:])]], (x[:3], y[:3], sq_loss), "mean")
    al, ref, _ = oracle_alignment(ds, per_example_grads_loop(model, sq_loss, x, y),
                                  per_example_grads_loop(model, sq_loss, x[:3], y[:3]))
    close(ds.alignment.values[0], al, model, x)
    close(ds.ref_alignment.values[0], ref, model, x)


def test_reused_and_refreshed_reference_against_the_parameters_of_ref_step(tmp_path):
    """R from ref_step's parameters while reused; a probe after the optimizer step of the same step gets a new R."""
    import copy

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(3)
    rx, ry = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    px, py = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    batches, snapshots, probe_params = [], [], None
    with GradientLogger(model, tmp_path / "s.zarr", reference=(rx, ry, ce), reference_every=2) as glog:
        for step in range(3):
            x, y = torch.randn(6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen)
            snapshots.append(copy.deepcopy(model))
            batches.append((x, y))
            with glog.record(step):
                ce(model(x), y).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 2:
                probe_params = copy.deepcopy(model)
                glog.probe(step, px, py, ce)
    ds = open_logged(tmp_path / "s.zarr")
    assert ds.ref_step.values.tolist() == [0, 0, 2]
    for step, (x, y) in enumerate(batches):
        at = snapshots[int(ds.ref_step.values[step])]  # R of the parameters at ref_step, before its update
        _, ref, _ = oracle_alignment(ds, per_example_grads_loop(snapshots[step], ce, x, y),
                                     per_example_grads_loop(at, ce, rx, ry))
        close(ds.ref_alignment.values[step], ref, model, x)
    probe = open_logged(tmp_path / "s.zarr", "probe")
    assert probe.ref_step.values.tolist() == [2]
    _, ref, _ = oracle_alignment(probe, per_example_grads_loop(probe_params, ce, px, py),
                                 per_example_grads_loop(probe_params, ce, rx, ry))
    close(probe.ref_alignment.values[0], ref, model, px)  # the parameters after step 2's update, not those of its batch


def test_kept_forms_are_released_when_the_block_raises(tmp_path):
    model = _mlp()
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    with GradientLogger(model, tmp_path / "s.zarr", alignment=True) as glog:
        with pytest.raises(RuntimeError, match="boom"), glog.record(0):
            sq_loss(model(x), y).mean().backward()
            raise RuntimeError("boom")
        assert all(not t.kept for t in glog.trackers)
        with pytest.raises(ValueError), glog.record(1, index=torch.arange(9)):  # bad metadata: reduce raises
            sq_loss(model(x), y).mean().backward()
        assert all(not t.kept for t in glog.trackers)
    model.zero_grad()
    with GradientLogger(model, tmp_path / "r.zarr", reference=(x, y, sq_loss)) as glog:
        with glog.record(0):
            sq_loss(model(x), y).mean().backward()
            assert all(not t.kept for t in glog.trackers)  # a reference alone keeps no forms


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_alignment_refuses_an_input_modified_after_the_backward(kind, tmp_path):
    """The forms kept for the alignment read the layers' inputs at the end of the record block (no copies): an input
    modified in place between the backward pass and then raises, naming the layer, instead of a wrong alignment."""
    torch.manual_seed(3)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 4)
    else:  # a 3x3 stride-1 convolution, many channels on a small map: the ghost norm from the input map's Gram, its
        # kept form reads the input (patches formed when the alignment reads them)
        model, x = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Flatten()), torch.randn(5, 32, 4, 4)
    y = target_for(model, x)
    with GradientLogger(model, tmp_path / "s.zarr", alignment=True) as glog:
        with pytest.raises(RuntimeError, match=r"layer '0'.*modified in place after the backward"):
            with glog.record(0):
                sq_loss(model(x), y).mean().backward()
                x.mul_(2.0)
        model.zero_grad()
        with glog.record(1):  # the logger carries on with the next step
            sq_loss(model(x), y).mean().backward()
    ds = open_logged(tmp_path / "s.zarr")
    assert ds.sizes["step"] >= 1 and np.isfinite(ds.alignment.values[-1]).all()


def _alignment_with_and_without_an_inplace_op(model, x, tmp_path, factor):
    """The stored alignments of one logged step, without and with ``x`` multiplied in place by ``factor`` after the
    backward (inside the record block)."""
    y = target_for(model, x)
    stored = []
    for modify in (False, True):
        xi = x.clone()
        with GradientLogger(model, tmp_path / f"{modify}.zarr", alignment=True) as glog:
            with glog.record(0):
                sq_loss(model(xi), y).mean().backward()
                if modify:
                    xi.mul_(factor)
        model.zero_grad()
        stored.append(open_logged(tmp_path / f"{modify}.zarr").alignment.values)
    return stored


def test_alignment_ignores_inputs_its_kept_forms_do_not_read(tmp_path):
    """A LayerNorm first layer keeps a materialised form (a copy): its input modified in place after the backward
    changes nothing, and nothing is raised; the stored alignment equals a run without the in-place op."""
    torch.manual_seed(4)
    model, x = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 3)), torch.randn(5, 8)
    before, after = _alignment_with_and_without_an_inplace_op(model, x, tmp_path, 0.0)
    assert np.array_equal(before, after)


def test_alignment_of_a_reduced_form_ignores_inputs_modified_after_the_backward(tmp_path):
    """A Linear over many positions takes the materialised route, formed chunk by chunk and only reduced
    (:class:`~gradcoh.logger.grads.Reduced`, which keeps the factors: views of the input). The alignment keeps a
    materialised copy of it, so the input modified in place after the backward changes nothing and nothing is
    raised; the stored alignment equals a run without the in-place op (kept lazily, it would read the new input)."""
    from gradcoh.logger import grads

    torch.manual_seed(5)
    model, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 64, 4)  # T = 64: materialising is far cheaper
    assert grads.materialise_is_cheaper(5, 64, 3, 5, 4)
    before, after = _alignment_with_and_without_an_inplace_op(model, x, tmp_path, 2.0)
    assert np.isfinite(before).all() and np.array_equal(before, after)
