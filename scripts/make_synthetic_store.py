"""Write a gradcoh store of any size from a known generative model, through the real writer path.

Per step t and layer l, per-example gradients are drawn i.i.d. as

    g_{i,l} = μ_l + σ_l ε_{i,l},   ε ~ N(0, I_{P_l}),   i = 1..m

with a fixed mean μ_l (a random direction, norm set from the requested population coherence). The population
coherence (the coherence α of a distribution in Chatterjee & Zielinski, "Making Coherence Out of Nothing At All:
Measuring the Evolution of Gradient Alignment") is α_pop = ‖μ‖² / E‖g‖² = ‖μ‖² / (‖μ‖² + Σ_l P_l σ_l²), so

    E[m-coherence] = E‖Σ g_i‖² / E Σ‖g_i‖² = 1 + (m − 1) α_pop        (exact for the ratio of expectations)

for the network, for each layer (with that layer's α_l) and for each group of m_a examples (1 + (m_a − 1) α_pop).
The statistics (``sq_norm``, ``sum_sq_norm``, ``group_gram``) are computed exactly from the sampled gradients and the
sketches with the logger's own :class:`~gradcoh.logger.sketch.Projection` (CountSketch, ``dense``); records are fed to
:class:`~gradcoh.logger.writer.AsyncWriter` / :class:`~gradcoh.logger.store.StreamWriter` exactly as
:class:`~gradcoh.logger.GradientLogger` does. The truth is stored in the root attribute ``gradcoh_synthetic``.

Standard deviation of one step's m-coherence (delta method; ‖S_l‖² = ‖mμ_l + σ_l√m z_l‖²):

    Var‖S‖² = Σ_l (4 m³ σ_l² ‖μ_l‖² + 2 m² P_l σ_l⁴),   sd(m-coh) ≈ sqrt(Var‖S‖²) / (m E‖g‖²)  (⊕ the Q term)

(:func:`expected`). Example::

    python scripts/make_synthetic_store.py /tmp/syn.zarr --steps 32 --m 1024 --alpha 0.01 --sketch-dim 64
    python scripts/make_synthetic_store.py s3://bucket/syn.zarr --storage-options '{"anon": false}' ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from gradcoh.logger import schema
from gradcoh.logger.sketch import SKETCH_KIND, SKETCH_VERSION, Projection
from gradcoh.logger.store import HostRecord, StreamWriter, open_run
from gradcoh.logger.writer import AsyncWriter

SYNTHETIC_KEY = "gradcoh_synthetic"
DEFAULT_LAYERS = ((16, 16), (32, 16), (16, 8), (8, 4))  # (rows, cols) per layer: P = 256, 512, 128, 32


@dataclass
class Spec:
    """Parameters of the generative model and the store layout."""

    steps: int = 8
    m: int = 256
    layers: tuple[tuple[int, int], ...] = DEFAULT_LAYERS
    alpha: float = 0.01  # population coherence of every layer (hence of the network)
    sigma: float = 1.0
    sketch_dim: int = 64
    sketch_dtype: str = "float16"
    groups: tuple[str, ...] = ("clean", "corrupted")
    group_p: float = 0.25  # share of examples in the last group
    n_classes: int = 10
    seed: int = 0
    names: tuple[str, ...] = field(default=())

    def layer_names(self) -> list[str]:
        return list(self.names) or [f"layers.{j}" for j in range(len(self.layers))]


def _means(spec: Spec) -> list[np.ndarray]:
    """μ_l: a fixed random direction with ‖μ_l‖² = α/(1−α) · P_l σ² (so that α_l = α)."""
    rng = np.random.default_rng([spec.seed, 1])
    out = []
    for rows, cols in spec.layers:
        p = rows * cols
        direction = rng.normal(size=p)
        direction /= np.linalg.norm(direction)
        out.append(direction * math.sqrt(spec.alpha / (1.0 - spec.alpha) * p * spec.sigma**2))
    return out


def expected(spec: Spec, m: int | None = None) -> dict[str, Any]:
    """Analytic population coherence, expected m-coherence and its per-step standard deviation."""
    m = spec.m if m is None else m
    mu2 = np.array([float(v @ v) for v in _means(spec)])
    noise = np.array([rows * cols * spec.sigma**2 for rows, cols in spec.layers], dtype=float)
    p = np.array([rows * cols for rows, cols in spec.layers], dtype=float)
    e_g2 = mu2 + noise  # E‖g_l‖² per layer

    def sd(mu2_: np.ndarray, p_: np.ndarray, e_: float, coh: float) -> float:
        var_num = (4 * m**3 * spec.sigma**2 * mu2_ + 2 * m**2 * p_ * spec.sigma**4).sum()
        var_g2 = (4 * spec.sigma**2 * mu2_ + 2 * p_ * spec.sigma**4).sum()  # Var‖g‖² of one example
        rel_q = math.sqrt(var_g2 / m) / e_
        return math.sqrt(var_num / (m * e_) ** 2 + (coh * rel_q) ** 2)

    alpha_net = float(mu2.sum() / e_g2.sum())
    coh_net = 1.0 + (m - 1) * alpha_net
    per_layer = [float(a) for a in mu2 / e_g2]
    coh_layer = [1.0 + (m - 1) * a for a in per_layer]
    return {
        "m": m,
        "alpha_pop": alpha_net,
        "m_coherence": coh_net,
        "m_coherence_sd": sd(mu2, p, float(e_g2.sum()), coh_net),
        "alpha_pop_layer": per_layer,
        "m_coherence_layer": coh_layer,
        "m_coherence_layer_sd": [
            sd(mu2[j : j + 1], p[j : j + 1], float(e_g2[j]), coh_layer[j]) for j in range(len(p))
        ],
    }


def _root_attrs(spec: Spec) -> dict[str, Any]:
    names = spec.layer_names()
    layers = [
        {"name": n, "type": "Synthetic", "size": r * c, "shapes": [[r, c]], "view": [r, c], "rule": "synthetic"}
        for n, (r, c) in zip(names, spec.layers, strict=True)
    ]
    sketch = None
    if spec.sketch_dim:
        sketch = {"kind": SKETCH_KIND, "version": SKETCH_VERSION, "dim": spec.sketch_dim, "seed": spec.seed,
                  "dtype": spec.sketch_dtype}
    config = {"every": 1, "sketch_dim": spec.sketch_dim, "seed": spec.seed, "loss_reduction": "sum",
              "groups": list(spec.groups), "sketch_dtype": spec.sketch_dtype,
              schema.IDENTITY_KEY: {"sketch_dim": spec.sketch_dim, "seed": spec.seed,
                                    "sketch_dtype": spec.sketch_dtype}}
    truth = {**asdict(spec), "layers": [list(x) for x in spec.layers], "groups": list(spec.groups),
             "names": names, "model": "g_il = mu_l + sigma * eps_il, eps ~ N(0, I)", "expected": expected(spec)}
    return {
        schema.FORMAT_KEY: schema.FORMAT_VERSION,
        schema.CONFIG_KEY: config,
        schema.LAYERS_KEY: layers,
        schema.SKETCH_KEY: sketch,
        schema.VERSIONS_KEY: {"gradcoh": "synthetic", "numpy": np.__version__, "torch": torch.__version__},
        schema.MODEL_KEY: "scripts.make_synthetic_store.Synthetic",
        schema.NOTES_KEY: ["synthetic store: i.i.d. Gaussian per-example gradients with a known mean"],
        SYNTHETIC_KEY: truth,
    }


def sample_step(spec: Spec, step: int, means: list[np.ndarray], sketches: list[Projection] | None) -> HostRecord:
    """Draw one step's gradients and reduce them to a :class:`HostRecord` (gradients are not kept)."""
    rng = np.random.default_rng([spec.seed, 2, step])
    m, n_groups = spec.m, len(spec.groups)
    group = (rng.random(m) < spec.group_p).astype(np.int64) * (n_groups - 1) if n_groups > 1 else np.zeros(m, int)
    onehot = np.eye(n_groups)[group]  # [m, G]
    labels = rng.integers(0, spec.n_classes, size=m)
    sq_norm = np.empty((m, len(spec.layers)))
    sum_sq = np.empty(len(spec.layers))
    gram = np.empty((len(spec.layers), n_groups, n_groups))
    sk = np.empty((m, len(spec.layers), spec.sketch_dim), np.float32) if sketches else None
    for j, ((rows, cols), mu) in enumerate(zip(spec.layers, means, strict=True)):
        g = rng.standard_normal((m, rows * cols))
        g *= spec.sigma
        g += mu
        sq_norm[:, j] = np.einsum("ij,ij->i", g, g)
        total = g.sum(0)
        sum_sq[j] = total @ total
        sums = onehot.T @ g  # [G, P]
        gram[j] = sums @ sums.T
        if sketches:
            sk[:, j] = sketches[j].dense(torch.from_numpy(g.reshape(m, rows, cols))).numpy()
    return HostRecord(
        step=step, wall_time=time.time(), sq_norm=sq_norm, sum_sq_norm=sum_sq, group_gram=gram,
        index=np.arange(m, dtype=np.int64) + step * m, label=labels, true_label=labels.copy(), group=group,
        loss=np.ones(m, np.float32), finite=np.ones(len(spec.layers), bool), sketch=sk,
    )


def _projections(spec: Spec) -> list[Projection] | None:
    """The logger's sketch projection of every layer (None without sketches)."""
    if not spec.sketch_dim:
        return None
    return [Projection.create(spec.seed, name, (r, c), spec.sketch_dim, "countsketch", "cpu")
            for name, (r, c) in zip(spec.layer_names(), spec.layers, strict=True)]


def make_synthetic_store(path: str, spec: Spec, *, storage_options: dict | None = None,
                         mode: str = "overwrite", flush_secs: float = 60.0) -> dict[str, Any]:
    """Write ``spec.steps`` steps of ``spec.m`` examples to ``path`` (local path or fsspec URL).

    Returns:
        The analytic truth (:func:`expected`) plus ``seconds`` (generation + writing).
    """
    start = time.perf_counter()
    attrs = _root_attrs(spec)
    root = open_run(path, mode, attrs, storage_options).root
    means = _means(spec)
    sketches = _projections(spec)
    layers = attrs[schema.LAYERS_KEY]

    def make_stream(name: str) -> StreamWriter:
        return StreamWriter(root, name, layers, tuple(spec.groups), spec.sketch_dim, spec.sketch_dtype)

    writer = AsyncWriter(make_stream, path, queue_size=4, on_full="block", flush_secs=flush_secs)
    try:
        for t in range(spec.steps):
            writer.put(schema.STREAM_BATCH, sample_step(spec, t, means, sketches))
    finally:
        writer.close()
    return {**expected(spec), "seconds": time.perf_counter() - start}


def _parse_layers(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in part.split("x")) for part in text.split(","))  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="store path or fsspec URL (credentials from the environment)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--m", type=int, default=256, help="examples per step")
    parser.add_argument("--layers", default=",".join(f"{r}x{c}" for r, c in DEFAULT_LAYERS),
                        help="rows x cols per layer, comma separated (P_l = rows*cols)")
    parser.add_argument("--alpha", type=float, default=0.01, help="population coherence α_pop of every layer")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--sketch-dim", type=int, default=64)
    parser.add_argument("--sketch-dtype", default="float16", choices=schema.SKETCH_DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage-options", default=None, help="JSON fsspec options (no secrets: use env vars)")
    args = parser.parse_args(argv)
    spec = Spec(steps=args.steps, m=args.m, layers=_parse_layers(args.layers), alpha=args.alpha, sigma=args.sigma,
                sketch_dim=args.sketch_dim, sketch_dtype=args.sketch_dtype, seed=args.seed)
    options = json.loads(args.storage_options) if args.storage_options else None
    print(json.dumps(make_synthetic_store(args.path, spec, storage_options=options), indent=1))


if __name__ == "__main__":
    main()
