"""Scheduler helpers: no client by default, address / env variable, progress on stderr only."""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster
from gradcoh.analysis import compute, connect, m_coherence, open_store, session


def test_no_address_no_workers_means_default_scheduler(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert connect() is None
    with session() as client:
        assert client is None


def test_bad_worker_count(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ValueError):
        connect(workers=0)


def test_progress_goes_to_stderr(small_store, capsys):
    lazy = m_coherence(open_store(small_store.path))
    result = compute(lazy, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "Completed" in captured.err
    assert result.shape == (5,)


def test_distributed_client_via_env(small_store, monkeypatch, capsys):
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        lazy = m_coherence(open_store(small_store.path), by="group")
        expected = lazy.compute(scheduler="sync")
        with session() as client:
            assert isinstance(client, Client)
            got = compute(lazy, progress=True)
        assert capsys.readouterr().out == ""
    assert got.equals(expected)
