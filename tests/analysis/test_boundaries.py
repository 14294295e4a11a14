"""gradcoh.analysis (and the analysis CLI) must never import torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_analysis_imports_with_torch_blocked():
    result = _run(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import gradcoh.analysis
        import gradcoh.analysis.plots
        from gradcoh.analysis import m_coherence, open_store, stiffness
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        """
    )
    assert result.returncode == 0, result.stderr


def test_cli_main_does_not_import_analysis_or_torch():
    result = _run(
        """
        import sys
        sys.modules["torch"] = None
        import gradcoh.cli.main
        heavy = [m for m in ("xarray", "dask", "zarr", "matplotlib") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    assert result.returncode == 0, result.stderr
