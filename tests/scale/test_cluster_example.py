"""scripts/cluster_example.py (the documented LocalCluster pattern) runs from a file and prints m-coherence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from gradcoh import analysis
from tolerance import assert_close

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster_example.py"


def test_cluster_example_script(rich_store):
    out = subprocess.run([sys.executable, str(SCRIPT), str(rich_store.path), "--workers", "2"], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    values = np.array([float(line.split()[1]) for line in out.stdout.strip().splitlines()])
    expected = analysis.m_coherence(analysis.open_store(rich_store.path)).values
    assert_close(values, expected, n=1, dtype="decimal6", err_msg="printed m-coherence")  # the script prints %.6g
