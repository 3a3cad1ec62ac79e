"""Reliability diagrams (DeGroot and Fienberg 1983; Guo et al. 2017) from ``CalibrationStats``."""

from __future__ import annotations

import os

from fastkd.calibration import CalibrationStats

ACCURACY = dict(color="#4C72B0", edgecolor="white")
# The gap from a bin's accuracy to its mean confidence. Above the bar (over-confident) it lies on the
# white background: a light tint and a red hatch. Inside the bar (under-confident) a tint would mix
# with the bar's blue, so it is a hatch alone, in a colour that reads on blue; its legend entry draws
# it over a bar, as in the plot.
OVER = dict(facecolor=(0.87, 0.27, 0.27, 0.15), edgecolor="#AA2222", hatch="//", linewidth=0.8)
UNDER = dict(facecolor="none", edgecolor="#F0B030", hatch="\\\\", linewidth=0.8)
DIAGONAL = dict(color="0.4", linestyle="--", linewidth=1)
COUNT_COLOR = "0.55"


def legend_entries():
    """The diagram's legend: (handles, labels), proxies styled as the plotted artists."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bar = Patch(facecolor=ACCURACY["color"], edgecolor=ACCURACY["edgecolor"])
    handles = [Line2D([], [], **DIAGONAL), bar, Patch(**OVER), (Patch(facecolor=ACCURACY["color"]), Patch(**UNDER))]
    labels = ["perfect calibration", "accuracy", "gap, over-confident", "gap, under-confident"]
    return handles, labels


def summary(stats: CalibrationStats) -> str:
    """One line of the numbers a diagram shows: ECE, MCE, accuracy and the number of rows."""
    return f"ECE {stats.ece('l1'):.1%}, MCE {stats.ece('max'):.1%}, accuracy {stats.accuracy:.1%}, n = {stats.count:,}"


def reliability_diagram(
    stats: CalibrationStats,
    path: str | os.PathLike | None = None,
    ax=None,
    title: str | None = None,
    count_ax=None,
    legend: bool = True,
):
    """Draw the accuracy of each confidence bin against its confidence, and return the figure.

    Bars: each non-empty bin's accuracy; hatched: the gap to the bin's mean confidence, red above the
    bar (over-confident), amber inside it (under-confident); the diagonal: perfect calibration. The
    title's second line gives ECE, MCE, accuracy and row count. Below, the rows per bin (log scale).
    Without ``ax`` the figure has both panels and the legend under them; with ``ax`` the diagram is
    drawn there, the counts into ``count_ax`` if given, and the legend (unless ``legend=False``: draw a
    shared one from ``legend_entries()``) outside ``ax``'s right edge. ``path`` saves the figure (the format
    from the suffix, e.g. ``.png``). Needs matplotlib.
    """
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be CalibrationStats (from fastkd.calibration_stats), got {type(stats).__name__}")
    try:
        from matplotlib.figure import Figure  # not pyplot: no global figure registry to fill up
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    except ImportError as error:
        raise ImportError("reliability_diagram needs matplotlib: pip install matplotlib") from error

    edges = stats.bin_edges.numpy()
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    count = stats.bin_count.cpu().numpy()
    filled = count > 0
    accuracy = stats.bin_accuracy.cpu().numpy()
    confidence = stats.bin_confidence.cpu().numpy()

    own_figure = ax is None
    if own_figure:
        fig = Figure(figsize=(5, 6.8), layout="constrained")
        ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        fig = ax.figure
    ax.plot([0, 1], [0, 1], **DIAGONAL)
    ax.bar(centers[filled], accuracy[filled], width=width, **ACCURACY)
    gap = confidence - accuracy
    over, under = filled & (gap >= 0), filled & (gap < 0)
    ax.bar(centers[over], gap[over], bottom=accuracy[over], width=width, **OVER)  # from the bar's top up
    ax.bar(centers[under], -gap[under], bottom=confidence[under], width=width, **UNDER)  # inside the bar
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\n{summary(stats)}" if title else summary(stats), fontsize=9)
    if legend:  # outside the axes: no bar is ever under it
        handles, labels = legend_entries()
        if own_figure:
            fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
        else:
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
    if count_ax is None:
        ax.set_xlabel("confidence")
    else:
        count_ax.bar(centers[filled], count[filled], width=width, color=COUNT_COLOR, edgecolor="white")
        # Decades only, from 1 (a bin of one row still shows) to above the fullest bin: a few labels.
        count_ax.set_yscale("log")
        count_ax.set_ylim(0.7, max(10.0, 2.0 * count.max()))
        count_ax.yaxis.set_major_locator(LogLocator(base=10, numticks=4))
        count_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        count_ax.yaxis.set_minor_locator(NullLocator())
        count_ax.set_ylabel("rows")
        count_ax.set_xlabel("confidence")
        count_ax.set_xlim(0, 1)
        ax.tick_params(labelbottom=False)
    if path is not None:  # a figure of its own is laid out to fit; given axes may have the legend outside
        fig.savefig(path, dpi=120, bbox_inches=None if own_figure else "tight")
    return fig
