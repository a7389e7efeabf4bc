"""``loss.png``: the loss curves of a run, drawn from its ``metrics.csv`` (matplotlib, no display needed).

Written at every checkpoint save and when training ends, so a run in progress always has one no older than
its last checkpoint. The total loss is drawn thick, each term thin, against the iteration (log scale, since
terms differ by orders of magnitude); the validation segm and bbox AP of ``--eval-every`` share the x axis
on the right. The file is written atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os

from dynamask.atomic import write_atomic

LOSS_PLOT_FILE = "loss.png"


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _plotted(column: str) -> bool:
    return column == "loss" or column.startswith("loss_") or (column.startswith("val_") and column.endswith("_AP"))


def read_series(csv_path: str) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(iteration, value), ...]}`` of the loss and AP columns of ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            it = _float(row.get("iteration"))
            if it is None:
                continue
            for key, text in row.items():
                if key and _plotted(key):
                    value = _float(text)
                    if value is not None:
                        series.setdefault(key, []).append((int(it), value))
    return series


def write_loss_plot(csv_path: str, png_path: str) -> str | None:
    """Draws ``csv_path``'s curves into ``png_path``; None (nothing written) when it has no loss yet."""
    if not os.path.isfile(csv_path):
        return None
    series = read_series(csv_path)
    if "loss" not in series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)  # a Figure of its own: no pyplot state shared with the caller
    ax = fig.add_subplot()
    positive = all(v > 0 for k, pts in series.items() if k.startswith("loss") for _, v in pts)
    for key in sorted(k for k in series if k.startswith("loss_")):
        xs, ys = zip(*series[key])
        ax.plot(xs, ys, lw=0.8, alpha=0.8, label=key)
    xs, ys = zip(*series["loss"])
    ax.plot(xs, ys, lw=2.0, color="black", label="loss (back-propagated)")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    aps = sorted(k for k in series if k.startswith("val_"))
    if aps:
        ax2 = ax.twinx()
        for key in aps:
            xs, ys = zip(*series[key])
            label = key.replace("val_", "val ").replace("_", " ")
            ax2.plot(xs, [100 * y for y in ys], marker="o", ls="--", label=label)
        ax2.set_ylabel("validation AP (%)")
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # beside the axes, not over the curves
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.1 if aps else 1.01, 1.0))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return write_atomic(png_path, lambda f: f.write(buffer.getvalue()), suffix=".png")


def plot_run(out_dir: str) -> str | None:
    """``OUT/loss.png`` from ``OUT/metrics.csv``. A plot is a convenience: a failure to draw it (a font, a
    backend) is logged as a warning and never stops the run."""
    try:
        return write_loss_plot(os.path.join(out_dir, "metrics.csv"), os.path.join(out_dir, LOSS_PLOT_FILE))
    except Exception as exc:
        logging.getLogger("dynamask.train").info(f"warning: {LOSS_PLOT_FILE} not drawn: {type(exc).__name__}: {exc}")
        return None
