"""``gradcoh metrics STORE``: per-step m-coherence family and sketch-based pairwise metrics."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import (
    FormatOpt,
    LayersOpt,
    OutFormat,
    OutOpt,
    ProgressOpt,
    SchedulerOpt,
    StderrOpt,
    StoreArg,
    StreamOpt,
    WorkersOpt,
)
from gradcoh.cli.output import emit_analysis

__all__ = ["metrics"]


def metrics(
    store: StoreArg,
    stream: StreamOpt = None,
    layers: LayersOpt = None,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="Rows per block of pairwise work.")] = 1024,
    stderr: StderrOpt = False,
    fmt: FormatOpt = OutFormat.table,
    out: OutOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Per-step metrics: the exact m-coherence family and, with sketches, pairwise estimates.

    \b
    Columns (one row per step; m = examples in the step):
      m_coherence         ‖Σg‖²/Σ‖g‖² (exact): 1 orthogonal, m identical, < 1 cancelling
      alpha               m_coherence / m
      debiased_alpha      (m_coherence − 1)/(m − 1): mean pairwise alignment, 0 for orthogonal
      gradient_diversity  Σ‖g‖²/‖Σg‖² = 1/m_coherence (Yin et al. 2018)
      noise_scale         B_simple = tr Σ / ‖ḡ‖² (McCandlish et al. 2018)
    With sketches (estimates from the per-example sketches):
      cos_global          mean cosine over all pairs of examples (stiffness, Fort et al. 2019)
      cos_within          mean cosine over pairs with the same label
      cos_between         mean cosine over pairs with different labels
      sign_global, sign_within, sign_between
                          the same for sign stiffness (the mean of sign(g_i·g_j))
      min_cos             smallest pairwise cosine (gradient confusion, Sankararaman et al. 2019)
      frac_negative       fraction of pairs with a negative cosine
      cos_q05, cos_median 5% quantile and median of the pairwise cosines
    With --stderr, <column>_stderr for each: the jackknife standard error of a sketch estimate, 0 when exact.
    """  # noqa: D301 (the backspace is click's "keep line breaks" marker)
    with reported(store):
        from gradcoh import analysis

        analyse = partial(analysis.metrics_summary, layers=layers or None, block_size=block_size,
                          stderr=stderr)
        emit_analysis(store, stream, analyse, fmt, out, scheduler=scheduler, workers=workers, progress=progress)
