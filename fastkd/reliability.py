"""Reliability diagrams (DeGroot and Fienberg 1983; Guo et al. 2017) from ``CalibrationStats``."""

from __future__ import annotations

import os

from fastkd.calibration import CalibrationStats


def reliability_diagram(stats: CalibrationStats, path: str | os.PathLike | None = None, ax=None, title: str | None = None):
    """Draw the accuracy of each confidence bin against its confidence, and return the figure.

    Bars: each non-empty bin's accuracy; hatched red bars: the gap to the bin's mean confidence (above
    the bar's top: over-confident, below it: under-confident); the diagonal: perfect calibration. The ECE, MCE,
    accuracy and row count head the legend. Without ``ax`` the figure has a second panel,
    the histogram of rows per bin (log scale); with ``ax`` only the diagram is drawn there. ``path``
    saves the figure (the format from the suffix, e.g. ``.png``). Needs matplotlib.
    """
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be CalibrationStats (from fastkd.calibration_stats), got {type(stats).__name__}")
    try:
        from matplotlib.figure import Figure  # not pyplot: no global figure registry to fill up
    except ImportError as error:
        raise ImportError("reliability_diagram needs matplotlib: pip install matplotlib") from error

    edges = stats.bin_edges.numpy()
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    count = stats.bin_count.cpu().numpy()
    filled = count > 0
    accuracy = stats.bin_accuracy.cpu().numpy()
    confidence = stats.bin_confidence.cpu().numpy()

    hist_ax = None
    if ax is None:
        fig = Figure(figsize=(5, 6.2))
        ax, hist_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    else:
        fig = ax.figure
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="perfect calibration")
    ax.bar(centers[filled], accuracy[filled], width=width, color="#4C72B0", edgecolor="white", label="accuracy")
    gap = confidence - accuracy
    # A light tint and a hatch: under-confident gaps lie over the accuracy bar and must not hide it.
    ax.bar(centers[filled], gap[filled], bottom=accuracy[filled], width=width, color=(0.87, 0.27, 0.27, 0.15),
           edgecolor="#AA2222", hatch="//", linewidth=0.8, label="gap to confidence")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    summary = (f"ECE {stats.ece('l1'):.2%}\nMCE {stats.ece('max'):.2%}\n"
               f"accuracy {stats.accuracy:.2%}\nn = {stats.count}")  # fmt: skip
    # The numbers head the legend: one box, placed where it hides the fewest bars.
    ax.legend(title=summary, alignment="left", loc="best", fontsize=8, title_fontsize=9, framealpha=0.85)
    if title:
        ax.set_title(title)
    if hist_ax is None:
        ax.set_xlabel("confidence")
    else:
        hist_ax.bar(centers, count, width=width, color="0.55", edgecolor="white")
        hist_ax.set_yscale("log" if filled.any() else "linear")
        hist_ax.set_ylabel("rows")
        hist_ax.set_xlabel("confidence")
        hist_ax.set_xlim(0, 1)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
