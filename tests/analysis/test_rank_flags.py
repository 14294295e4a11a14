"""Multi-process stores: each rank's ``finite``/``reconciled``/``guard_checked`` flags count, and every reader
(``open_store``, ``describe_store``/``gradcoh info``, ``list_streams`` and the CLI's stream choice) sees the
streams inside the per-rank groups."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from gradcoh import analysis
from gradcoh.cli.main import app
from gradcoh.logger import schema
from storefactory import build_store, random_gradients
from typer.testing import CliRunner

FLAGS = {  # per rank: (step, layer) flags as each rank stored them
    schema.FINITE: [[[1, 1], [1, 1], [1, 1]], [[1, 1], [1, 1], [1, 0]]],
    schema.RECONCILED: [[[1, 1], [1, 1], [1, 1]], [[1, 1], [0, 1], [1, 1]]],
    schema.GUARD_CHECKED: [[[1, 1], [1, 0], [0, 1]], [[1, 1], [1, 0], [0, 0]]],
}


def _two_rank_store(path, rng, drop_checked_of=None):
    zarr.open_group(str(path), mode="w", zarr_format=3)
    for rank in range(2):
        grads = random_gradients(rng, n_steps=3, m=4, sizes=(4, 3))
        build_store(path / schema.rank_group(rank), grads, probe=grads[:2])
        stream = zarr.open_group(str(path / schema.rank_group(rank) / schema.STREAM_BATCH), mode="a")
        for name, values in FLAGS.items():
            if name == schema.GUARD_CHECKED and rank == drop_checked_of:
                continue
            stream.create_array(name, data=np.array(values[rank], dtype=bool),
                                dimension_names=schema.VARIABLES[name][0], overwrite=True)
    root = zarr.open_group(str(path), mode="a")
    root.attrs.update({**zarr.open_group(str(path / schema.rank_group(0))).attrs.asdict(),
                       schema.WORLD_SIZE_KEY: 2})


def test_a_flag_on_any_rank_is_the_runs_flag(tmp_path):
    """A layer-step flagged, non-finite or unchecked on rank 1 only is so for the run (not rank 0's flags alone)."""
    path = tmp_path / "ddp.zarr"
    _two_rank_store(path, np.random.default_rng(4))
    ds = analysis.open_store(path)
    for name, values in FLAGS.items():
        np.testing.assert_array_equal(ds[name].values, np.logical_and(*np.array(values, dtype=bool)), err_msg=name)
    with pytest.warns(RuntimeWarning):
        m = analysis.m_coherence(ds).values
    assert np.isfinite(m[0]) and np.isnan(m[1:]).all()  # step 1 flagged, step 2 not finite on rank 1 only
    counts = {"layer_steps": 6, "checked": 3, "flagged": 1}
    assert analysis.guard_coverage(ds) == counts
    assert analysis.describe_store(path)["streams"][schema.STREAM_BATCH]["guard"] == counts


def test_a_rank_without_guard_checked_claims_no_check(tmp_path):
    path = tmp_path / "ddp.zarr"
    _two_rank_store(path, np.random.default_rng(5), drop_checked_of=1)
    assert not analysis.open_store(path)[schema.GUARD_CHECKED].values.any()
    assert analysis.describe_store(path)["streams"][schema.STREAM_BATCH]["guard"]["checked"] == 0


def test_multi_process_store_streams_info_and_cli_stream_choice(tmp_path):
    path = tmp_path / "ddp.zarr"
    _two_rank_store(path, np.random.default_rng(6))
    assert analysis.list_streams(analysis.open_root(path)) == [schema.STREAM_BATCH, schema.STREAM_PROBE]
    batch = analysis.describe_store(path)["streams"][schema.STREAM_BATCH]
    assert batch["committed_steps"] == 3 and batch["m_min"] == batch["m_max"] == 8  # 4 examples on each rank
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(path)])
    assert info.exit_code == 0, info.output
    assert "stream batch: 3 steps" in info.output and "3 of 6 layer-steps checked, 1 flagged" in info.output
    coherence = runner.invoke(app, ["coherence", str(path)])
    assert coherence.exit_code == 0, coherence.output
    assert "stream: probe" in coherence.output  # the probe stream, as for a single-process store


def test_ranks_are_joined_by_step_number_when_one_dropped_a_step(tmp_path):
    """Rank 1 dropped step 10 (``on_full="drop"``): the run shows the steps both ranks hold, each rank's rows of
    that very step (joining rows by position would pair rank 0's step 10 with rank 1's step 20)."""
    rng = np.random.default_rng(8)
    path = tmp_path / "ddp.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3)
    grads = [random_gradients(rng, n_steps=3, m=4, sizes=(4, 3)) for _ in range(2)]
    grads[1] = [grads[1][0], grads[1][2]]
    for rank, steps in enumerate([[0, 10, 20], [0, 20]]):
        build_store(path / schema.rank_group(rank), grads[rank], steps=steps)
    root = zarr.open_group(str(path), mode="a")
    root.attrs.update({**zarr.open_group(str(path / schema.rank_group(0))).attrs.asdict(),
                       schema.WORLD_SIZE_KEY: 2})
    ds = analysis.open_store(path)
    assert list(ds.step.values) == [0, 20]
    for row, t in enumerate([0, 2]):  # rank 0's rows, then rank 1's, of the same step
        want = np.concatenate([(g * g).sum(1)[:, None] for g in grads[0][t]], 1)
        np.testing.assert_array_equal(ds.sq_norm.values[row, :4], want)
        want = np.concatenate([(g * g).sum(1)[:, None] for g in grads[1][row]], 1)
        np.testing.assert_array_equal(ds.sq_norm.values[row, 4:], want)
    stream = analysis.describe_store(path)["streams"][schema.STREAM_BATCH]
    assert (stream["committed_steps"], stream["first_step"], stream["last_step"]) == (2, 0, 20)
