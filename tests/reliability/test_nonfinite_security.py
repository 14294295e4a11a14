"""NaN/Inf gradients are stored as they are, flagged by ``finite``, and analyses give NaN (with a warning) there.
Plus the security checks: no pickle/eval of store contents; the local Dask dashboard binds to localhost."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh import analysis
from gradcoh.analysis import open_store
from gradcoh.logger import GradientLogger

PACKAGE = Path(analysis.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "run.zarr"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    with GradientLogger(model, path, sketch_dim=4, groups=("a", "b")) as glog:
        for s in range(4):
            x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
            if s == 2:
                x[1, 0] = float("nan")  # one example's gradient becomes NaN in every layer
            with glog.record(s, index=torch.arange(6), labels=y, group=torch.tensor([0, 1] * 3)):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
    return path


def test_nonfinite_steps_are_flagged_and_give_nan(nan_store):
    ds = open_store(nan_store)
    assert ds.finite.values.tolist() == [[True, True], [True, True], [False, False], [True, True]]
    assert np.isnan(ds.sq_norm.values[2, 1]).all()  # stored as they are
    for fn, kwargs in [
        (analysis.m_coherence, {}),
        (analysis.m_coherence, {"per_layer": True}),
        (analysis.m_coherence, {"by": "group"}),
        (analysis.alpha, {}),
        (analysis.noise_scale, {}),
        (analysis.cross_group_benefit, {}),
    ]:
        with pytest.warns(RuntimeWarning, match=r"1 of 4 steps have non-finite gradient statistics .*steps 2\)"):
            out = fn(ds, **kwargs).compute()
        values = out.values
        assert np.isnan(values[2]).all(), fn.__name__
        assert np.isfinite(np.delete(values, 2, axis=0)).all(), fn.__name__
    with pytest.warns(RuntimeWarning):
        frac = analysis.cg_fractions(ds).compute()
    assert np.isnan(frac.fraction.values[2]).all() and np.isfinite(frac.fraction.values[[0, 1, 3]]).all()


def test_finite_store_gives_no_warning(nan_store):
    import warnings

    ds = open_store(nan_store).isel(step=[0, 1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis.m_coherence(ds).compute()


def test_no_pickle_or_eval_in_the_package():
    pattern = re.compile(
        r"\bpickle\b|\bcloudpickle\b|(?<![.\w])eval\(|(?<![.\w])exec\(|\bmarshal\b|allow_pickle\s*=\s*True"
    )
    hits = []
    for sub in ("logger", "analysis", "cli"):
        for path in (PACKAGE / sub).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line.split("#")[0]):
                    hits.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not hits, hits


def test_local_cluster_binds_to_localhost():
    source = (PACKAGE / "analysis" / "cluster.py").read_text()
    calls = re.findall(r"LocalCluster\((.*?)\)", source, flags=re.S)
    assert calls and all('dashboard_address="127.0.0.1:0"' in c for c in calls), calls
    assert all("host=" not in c or 'host="127.0.0.1"' in c for c in calls)
