"""Smoke test of scripts/bench_overhead.py: one tiny run in a subprocess (peer methods only when installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_overhead.py"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


BASE = ["plain", "gradcoh_exact", "gradcoh_k256", "vmap"]
PEERS = [m for m, mod in (("opacus_ghost", "opacus"), ("backpack_l2", "backpack")) if _has(mod)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of the script for both tests (one interpreter and torch import instead of two): the tiny CNN with
    the probe comparison, and one tiny zoo model (GPT-2, 2 layers, d 32, T 16, batch 4), one thread."""
    pytest.importorskip("torchvision")
    models = "cnn,gpt2" if _has("transformers") else "cnn"
    tmp = tmp_path_factory.mktemp("bench")
    out, md = tmp / "bench.json", tmp / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--overhead", "--probe", "--models", models, "--threads", "1",
         "--methods", ",".join(BASE + PEERS), "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def _result(report, model):
    (res,) = [r for r in report["overhead"] if r["model"] == model]
    return res


def test_bench_tiny(bench):
    report, md = bench
    res = _result(report, "cnn")
    assert list(res["methods"]) == BASE + PEERS
    for name in BASE:
        r = res["methods"][name]
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["reps"] == 1
    assert res["methods"]["plain"]["ratio"] == pytest.approx(1.0)
    probe = report["probe"]
    assert probe["rel_diff"] < 1e-5, probe
    assert "| gradcoh_exact |" in md


def test_bench_tiny_zoo_model(bench):
    """One tiny zoo model: the JSON has every method, failures recorded (Opacus ghost refuses GPT-2's tied
    embedding: a failure, not a crash)."""
    pytest.importorskip("transformers")
    report, md = bench
    res = _result(report, "gpt2")
    assert res["batch"] == 4
    assert "T 16" in res["size"] and "2 layers" in res["size"]
    assert list(res["methods"]) == BASE + PEERS
    for name in ("plain", "gradcoh_exact"):
        r = res["methods"][name]
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["reps"] == 1 and r["peak_extra_mb"] is not None
    assert res["methods"]["plain"]["ratio"] == pytest.approx(1.0)
    assert res["methods"]["gradcoh_exact"]["ratio"] > 0
    for name in ["gradcoh_k256", "vmap", *PEERS]:
        r = res["methods"][name]
        assert r["status"] == "ok" or r["status"].startswith("failed: "), r
        # vmap and Opacus ghost cover every parameter: the same per-example squared norms as gradcoh's (BackPACK's
        # BatchL2 covers part of GPT-2's parameters, so only its status is checked)
        if r["status"] == "ok" and name in ("vmap", "opacus_ghost"):
            assert r["rel_diff_vs_gradcoh"] < 1e-3, r
    assert "### gpt2" in md
