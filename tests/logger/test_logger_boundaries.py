"""gradcoh.logger never imports xarray, dask or typer; the store opens with plain xarray without gradcoh."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from gradcoh.logger import GradientLogger
from torch import nn


def _run(code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, cwd=cwd)


def test_logger_imports_without_xarray_dask_typer():
    result = _run(
        """
        import sys
        for name in ("xarray", "dask", "typer", "distributed"):
            sys.modules[name] = None
        import gradcoh.logger
        from gradcoh.logger import GradientLogger, LayerRules, default_rules
        from gradcoh.logger import schema, hook, layers, sketch, store, writer, tracker, grads
        """
    )
    assert result.returncode == 0, result.stderr


def test_schema_is_stdlib_only():
    result = _run(
        """
        import sys
        sys.modules["torch"] = None
        sys.modules["numpy"] = None
        from gradcoh.logger import schema
        assert schema.FORMAT_VERSION >= 1
        """
    )
    assert result.returncode == 0, result.stderr


def test_no_bare_top_level_packages():
    result = _run(
        """
        import importlib.util
        for name in ("logger", "analysis", "cli"):
            spec = importlib.util.find_spec(name)
            assert spec is None or "gradcoh" not in str(spec.origin), (name, spec)
        """,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr


def test_plain_xarray_opens_the_store_in_a_fresh_interpreter(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = tmp_path / "run.zarr"
    with GradientLogger(model, path, sketch_dim=8, groups=("clean", "corrupted")) as glog:
        for step in range(3):
            with glog.record(step, index=torch.arange(5), labels=torch.zeros(5, dtype=torch.long),
                             group=torch.tensor([0, 1, 0, 1, 0])):
                model(torch.randn(5, 4)).sum().backward()
    result = _run(
        f"""
        import sys
        import xarray as xr
        ds = xr.open_zarr({str(path)!r}, group="batch", consolidated=False)
        assert not [m for m in sys.modules if m.startswith("gradcoh.")], "gradcoh was imported"
        expected = {{"step": 3, "example": 5, "layer": 2, "group_i": 2, "group_j": 2, "proj": 8}}
        assert dict(ds.sizes) == expected, ds.sizes
        for v in ("sq_norm", "sum_sq_norm", "group_gram", "index", "label", "group", "loss", "sketch", "finite"):
            assert v in ds.variables, v
        assert list(ds.layer.values) == ["0", "2"] and list(ds.group_i.values) == ["clean", "corrupted"]
        assert ds.sq_norm.dims == ("step", "example", "layer")
        assert ds.group_gram.dims == ("step", "layer", "group_i", "group_j")
        assert list(ds.step.values) == [0, 1, 2]
        assert list(ds.layer_size.values) == [15, 8]
        """
    )
    assert result.returncode == 0, result.stderr
