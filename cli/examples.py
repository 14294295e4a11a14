"""``gradcoh examples STORE``: the examples that pull against the batch (or a reference set), most negative first."""

from __future__ import annotations

import enum
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
    StoreArg,
    WorkersOpt,
)
from gradcoh.cli.output import emit_analysis

__all__ = ["examples"]


class Normalize(enum.StrEnum):
    """How each step's alignment is scaled before averaging over steps."""

    cosine = "cosine"
    share = "share"
    raw = "raw"


def examples(
    store: StoreArg,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Rank by the alignment with the reference set's gradient (GradientLogger(reference=...)).")
    ] = False,
    top: Annotated[int, typer.Option("--top", min=0, help="Rows to show, most negative first (0: all).")] = 20,
    normalize: Annotated[Normalize, typer.Option("--normalize", help="Per-step scaling before averaging.")]
    = Normalize.cosine,
    stream: Annotated[str, typer.Option("--stream", help="Stream to read: batch or probe.")] = "batch",
    layers: LayersOpt = None,
    fmt: FormatOpt = OutFormat.table,
    out: OutOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Per dataset example: its alignment with the batch gradient over the steps it was seen, most negative first.

    \b
    Needs a store logged with GradientLogger(..., alignment=True) (or reference=... for --reference) and
    record(index=...). Columns (one row per dataset index):
      mean_alignment     mean over its steps of cos(g_i, G) (--normalize share: g_i·G/‖G‖², raw: g_i·G),
                         G the batch gradient of the step (--reference: the reference set's mean gradient R;
                         share then divides by |Σ_j g_j·R|)
      negative_fraction  share of its steps with negative alignment (it pulled against the batch)
      seen               steps it was logged in
      mean_loss          mean per-example loss (NaN unless rec.loss() was called)
      label, true_label, group, group_name
                         the last values logged for it (-1 when unknown)
    """  # noqa: D301 (the backspace is click's "keep line breaks" marker)
    with reported(store):
        from gradcoh import analysis

        def analyse(ds):
            ranked = analysis.rank_examples(ds, normalize=None if normalize is Normalize.raw else normalize.value,
                                            reference=reference, layers=layers or None)
            return ranked.isel(index=slice(0, top or None))

        emit_analysis(store, stream, analyse, fmt, out, scheduler=scheduler, workers=workers, progress=progress)
