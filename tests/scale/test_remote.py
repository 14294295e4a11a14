"""Remote stores: the real logger writes to memory:// and to a local S3 server (moto on loopback), open_store reads.

Credentials come from the environment (dummy values) or from storage_options, and must never reach the store.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid

import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from gradcoh import analysis
from gradcoh.analysis.compact import compact_store
from gradcoh.logger import GradientLogger, schema
from tolerance import PRODUCT, assert_close, chain_length
from torch import nn

SECRET = "gradcoh-dummy-secret-7Qx9"  # must never appear in a stored object
KEY_ID = "GRADCOHDUMMYKEYID42"


def _log_run(url: str, storage_options: dict | None, steps: int = 3) -> list[float]:
    """Train a tiny model for a few steps under the logger; return the m-coherence computed in torch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    expected = []
    with GradientLogger(model, url, sketch_dim=8, groups=("a", "b"), storage_options=storage_options,
                        loss_reduction="sum") as glog:
        for step in range(steps):
            x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
            group = torch.tensor([0, 1, 0, 1, 0, 0])
            with glog.record(step, index=torch.arange(6) + 6 * step, labels=y, group=group):
                F.cross_entropy(model(x), y, reduction="sum").backward()
            per_example = []
            for i in range(6):
                model.zero_grad()
                F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
                per_example.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
            g = torch.stack(per_example).double()
            expected.append(float(g.sum(0).square().sum() / g.square().sum()))
            model.zero_grad()
    return expected


def _check_round_trip(url: str, storage_options: dict | None) -> xr.Dataset:
    expected = _log_run(url, storage_options)
    ds = analysis.open_store(url, storage_options=storage_options)
    # float32 per-example gradients (logger and the torch loop, each through the model's chain) against m = 6,
    # the size of the m-coherence's numerator terms
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    assert_close(analysis.m_coherence(ds).values, expected, n=2 * chain_length(model), kappa=PRODUCT, scale=6,
                 err_msg="m-coherence")
    assert int(ds.sizes["step"]) == 3 and schema.SKETCH in ds
    assert analysis.describe_store(url, storage_options=storage_options)["streams"]["batch"]["committed_steps"] == 3
    return ds


def test_memory_round_trip():
    pytest.importorskip("fsspec")
    root = f"gradcoh-remote-{uuid.uuid4().hex}"
    url = f"memory://{root}/run.zarr"
    try:
        ds = _check_round_trip(url, None)
        by_group = analysis.m_coherence(ds, by="group").compute()
        assert list(by_group["group"].values) == ["a", "b"]
        compact_store(url, f"memory://{root}/run.compact.zarr")
        xr.testing.assert_equal(analysis.open_store(f"memory://{root}/run.compact.zarr").load(), ds.load())
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(f"/{root}", recursive=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs", reason="needs s3fs (pip install s3fs)")
    pytest.importorskip("moto.server", reason="needs moto[server]")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch, s3_endpoint):
    """Dummy credentials in the environment only; a fresh bucket."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"gradcoh-{_free_port()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


def _all_objects(s3_endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_s3_round_trip_credentials_from_env(s3_env, s3_endpoint):
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    url = f"s3://{s3_env}/runs/exp.zarr"
    ds = _check_round_trip(url, options)
    # the analysis also runs when the graph is shipped to cluster workers (storage options travel in the graph)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, Client(cluster):
        on_cluster = analysis.m_coherence(analysis.open_store(url, storage_options=options), per_layer=True).compute()
    xr.testing.assert_allclose(on_cluster, analysis.m_coherence(ds, per_layer=True).compute(scheduler="sync"))
    objects = _all_objects(s3_endpoint, s3_env)
    assert any(k.endswith("zarr.json") for k in objects)
    for key, body in objects.items():
        assert SECRET.encode() not in body and KEY_ID.encode() not in body, key
        assert s3_endpoint.encode() not in body, key


def test_s3_credentials_in_storage_options_are_not_stored(s3_env, s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}
    url = f"s3://{s3_env}/explicit.zarr"
    _log_run(url, options, steps=2)
    summary = compact_store(url, f"s3://{s3_env}/explicit.compact.zarr", storage_options=options)
    assert summary["verified"] and summary["objects_after"] <= summary["objects_before"]
    objects = _all_objects(s3_endpoint, s3_env)
    for key, body in objects.items():
        assert SECRET.encode() not in body and KEY_ID.encode() not in body, key
        if key.endswith("zarr.json"):
            text = json.dumps(json.loads(body))
            assert "secret" not in text.lower() and "endpoint" not in text.lower(), key
    ds = analysis.open_store(f"s3://{s3_env}/explicit.compact.zarr", storage_options=options)
    assert int(ds.sizes["step"]) == 2
