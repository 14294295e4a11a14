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


def test_bench_tiny(tmp_path):
    pytest.importorskip("torchvision")
    methods = ["plain", "gradcoh_exact", "gradcoh_k256", "vmap"]
    if _has("opacus"):
        methods.append("opacus_ghost")
    if _has("backpack"):
        methods.append("backpack_l2")
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--overhead", "--probe", "--methods", ",".join(methods),
         "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (res,) = report["overhead"]
    assert res["model"] == "cnn"
    assert set(res["methods"]) == set(methods)
    for name in ("plain", "gradcoh_exact", "gradcoh_k256", "vmap"):
        r = res["methods"][name]
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["reps"] == 1
    assert res["methods"]["plain"]["ratio"] == pytest.approx(1.0)
    probe = report["probe"]
    assert probe["rel_diff"] < 1e-5, probe
    assert "| gradcoh_exact |" in md.read_text()


def test_bench_tiny_zoo_model(tmp_path):
    """One tiny zoo model (GPT-2, 2 layers, d 32, T 16, batch 4): the JSON has every method, failures recorded."""
    pytest.importorskip("transformers")
    methods = ["plain", "gradcoh_exact", "vmap"]
    if _has("opacus"):
        methods.append("opacus_ghost")  # refuses GPT-2's tied embedding: recorded as a failure, not a crash
    out = tmp_path / "zoo.json"
    md = tmp_path / "zoo.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--models", "gpt2", "--threads", "1", "--methods", ",".join(methods),
         "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (res,) = report["overhead"]
    assert res["model"] == "gpt2" and res["batch"] == 4
    assert "T 16" in res["size"] and "2 layers" in res["size"]
    assert list(res["methods"]) == methods
    for name in ("plain", "gradcoh_exact"):
        r = res["methods"][name]
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["reps"] == 1 and r["peak_extra_mb"] is not None
    assert res["methods"]["plain"]["ratio"] == pytest.approx(1.0)
    assert res["methods"]["gradcoh_exact"]["ratio"] > 0
    for name in methods[2:]:
        r = res["methods"][name]
        assert r["status"] == "ok" or r["status"].startswith("failed: "), r
        if r["status"] == "ok":  # the same per-example squared norms as gradcoh's
            assert r["rel_diff_vs_gradcoh"] < 1e-3, r
    assert "| gradcoh_exact |" in md.read_text()
