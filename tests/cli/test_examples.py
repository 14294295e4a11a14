"""``gradcoh examples`` and ``gradcoh plot --kind alignment`` on a store with alignment and a reference."""

from __future__ import annotations

import json

import numpy as np
from cli_helpers import assert_one_line_error, invoke
from gradcoh import analysis
from storefactory import aligned_store, build_store, random_gradients


def test_cli_examples_csv_json_and_errors(tmp_path):
    store, _, _ = aligned_store(tmp_path / "a.zarr")
    result = invoke("examples", store.path, "--format", "json", "--top", "3")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    expected = analysis.rank_examples(analysis.open_store(store.path, stream="batch"))
    assert [r["index"] for r in doc["records"]] == expected["index"].values[:3].tolist()
    got = [r["mean_alignment"] for r in doc["records"]]
    assert got == expected["mean_alignment"].values[:3].tolist()  # the same float64 computation, repr round-trips
    result = invoke("examples", store.path, "--reference", "--format", "csv", "--normalize", "raw")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("index,mean_alignment,negative_fraction,seen")
    rng = np.random.default_rng(0)
    plain = build_store(tmp_path / "p.zarr", random_gradients(rng, n_steps=2, m=3, sizes=(2,)))
    assert_one_line_error(invoke("examples", plain.path), "alignment=True")


def test_cli_alignment_figure(tmp_path):
    store, _, _ = aligned_store(tmp_path / "a.zarr")
    out = tmp_path / "a.png"
    result = invoke("plot", store.path, "--kind", "alignment", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000
