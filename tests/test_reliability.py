"""reliability_diagram: one accuracy bar and one gap bar per filled bin; what a reader sees is right.

The rendered figure is checked as a reader would look at it: the legend hides no bar, each kind of
gap looks (in pixels) like its legend swatch, the count axis carries a few plain labels, and the
demo's overview shows the rows per bin of every model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastkd
from fastkd.calibration import CalibrationStats

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 150


def _stats():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 4
    target = torch.randint(0, 10, (500,), generator=g)
    return fastkd.calibration_stats(logits, target, n_bins=10, backend="torch")


def _binned(bins: dict[int, tuple[int, float, float]], n_bins: int = 10) -> CalibrationStats:
    """Stats with ``bins[m] = (rows, accuracy, mean confidence)``, the others empty."""
    count, correct, confidence = torch.zeros(n_bins, dtype=torch.int64), torch.zeros(n_bins, dtype=torch.int64), \
        torch.zeros(n_bins, dtype=torch.float64)  # fmt: skip
    for m, (rows, accuracy, conf) in bins.items():
        count[m], correct[m], confidence[m] = rows, round(rows * accuracy), rows * conf
    zero = torch.tensor(0.0, dtype=torch.float64)
    return CalibrationStats(count, correct, confidence, zero, zero)


# Under-confident bins (accuracy above confidence) at low confidence, over-confident ones at high; the
# counts span 15 to 600 rows, less than two decades (where a log axis used to label its minor ticks).
MIXED = {1: (15, 0.9, 0.15), 2: (600, 0.6, 0.25), 3: (400, 0.3, 0.35), 7: (20, 0.3, 0.75), 9: (60, 0.5, 0.95)}


def _render(fig):
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(DPI)
    canvas.draw()
    return canvas.get_renderer(), np.asarray(canvas.buffer_rgba())[..., :3].astype(int)


def _pixels(image, bbox, inset: int = 3):
    """The RGB pixels inside a display-space bbox (origin bottom left), ``inset`` pixels in from its edges."""
    height = image.shape[0]
    x0, x1 = int(np.ceil(bbox.x0)) + inset, int(np.floor(bbox.x1)) - inset
    y0, y1 = height - int(np.floor(bbox.y1)) + inset, height - int(np.ceil(bbox.y0)) - inset
    assert x1 > x0 and y1 > y0, bbox
    return image[y0:y1, x0:x1].reshape(-1, 3)


def _main_colours(pixels, share: float = 0.05):
    """The colours (rounded to multiples of 8) that cover at least ``share`` of the pixels, most first."""
    colours, counts = np.unique((pixels // 8) * 8, axis=0, return_counts=True)
    order = np.argsort(-counts)
    return [tuple(colours[i]) for i in order if counts[i] >= share * len(pixels)]


def _same_colours(a, b, tol: int = 24) -> bool:
    near = lambda c, cs: any(max(abs(x - y) for x, y in zip(c, d)) <= tol for d in cs)  # noqa: E731
    return all(near(c, b) for c in a) and all(near(c, a) for c in b)


def _bars(ax):
    return [p for p in ax.patches if p.get_height() > 0]


def test_writes_png_with_bars(tmp_path):
    stats = _stats()
    path = tmp_path / "reliability.png"
    fig = fastkd.reliability_diagram(stats, path=path, title="random logits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    diagram, counts = fig.axes
    filled = int((stats.bin_count > 0).sum())
    assert filled >= 5 and len(diagram.patches) == 2 * filled  # accuracy and gap bars
    heights = sorted(round(p.get_height(), 9) for p in diagram.patches[:filled])
    assert heights == sorted(round(a, 9) for a in stats.bin_accuracy[stats.bin_count > 0].tolist())
    assert len(counts.patches) == filled
    assert "random logits" in diagram.get_title() and f"ECE {stats.ece():.1%}" in diagram.get_title()


@pytest.mark.parametrize("own_axes", [False, True], ids=["own-figure", "given-axes"])
def test_legend_covers_no_bar(own_axes):
    stats = _binned({m: (50, 0.98, 0.1 * m + 0.05) for m in range(10)})  # bars up to the top in every bin
    if own_axes:
        fig = Figure(figsize=(6, 4), layout="constrained")
        fig = fastkd.reliability_diagram(stats, ax=fig.add_subplot())
    else:
        fig = fastkd.reliability_diagram(stats)
    renderer, _ = _render(fig)
    (legend,) = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    box = legend.get_window_extent(renderer)
    diagram = fig.axes[0]
    for bar in diagram.patches:
        assert not box.overlaps(bar.get_window_extent(renderer)), "the legend lies over a bar"
    assert not box.overlaps(diagram.get_window_extent(renderer)), "the legend lies inside the diagram"


def test_each_gap_looks_like_its_legend_swatch():
    stats = _binned(MIXED)
    fig = fastkd.reliability_diagram(stats)
    renderer, image = _render(fig)
    diagram = fig.axes[0]
    legend = fig.legends[0] if fig.legends else diagram.get_legend()
    accuracy, confidence = stats.bin_accuracy, stats.bin_confidence
    gaps = {"under": [], "over": []}
    for bar in diagram.patches[len(MIXED) :]:  # the gap bars, after the accuracy bars
        center = bar.get_x() + bar.get_width() / 2
        m = int(center * stats.n_bins)
        kind = "under" if accuracy[m] > confidence[m] else "over"
        gaps[kind].append(_main_colours(_pixels(image, bar.get_window_extent(renderer))))
    assert gaps["under"] and gaps["over"]
    swatches = [_main_colours(_pixels(image, handle.get_window_extent(renderer), inset=2))
                for handle in legend.legend_handles if isinstance(handle, matplotlib.patches.Patch)]  # fmt: skip
    for kind, looks in gaps.items():
        assert all(_same_colours(look, looks[0]) for look in looks), kind  # every gap of a kind alike
        matching = [s for s in swatches if _same_colours(s, looks[0])]
        assert matching, f"no legend swatch shows the {kind}-confident gaps' colours {looks[0]} (swatches: {swatches})"
    texts = [t.get_text() for t in legend.get_texts()]
    assert any("under" in t for t in texts) and any("over" in t for t in texts)


def test_count_axis_has_a_few_plain_labels():
    fig = fastkd.reliability_diagram(_binned(MIXED))
    _render(fig)
    counts = fig.axes[1]
    low, high = counts.get_ylim()
    labels = [(tick.get_loc(), tick.label1.get_text()) for tick in
              counts.yaxis.get_major_ticks() + counts.yaxis.get_minor_ticks()
              if tick.label1.get_visible() and tick.label1.get_text() and low <= tick.get_loc() <= high]  # fmt: skip
    assert 2 <= len(labels) <= 4, labels
    assert all(np.isclose(np.log10(loc), round(np.log10(loc))) for loc, _ in labels), labels  # decades only
    assert all(text.replace(",", "").isdigit() for _, text in labels), labels  # "100", not "$\\mathdefault{10^2}$"
    assert low <= 1 and high >= 600  # a bin of one row still shows; the fullest bin fits


def test_overview_shows_every_models_rows_per_bin(tmp_path, monkeypatch):
    import fastkd.demo.report as report

    drawn = []  # (stats, ax, count_ax) of each diagram that write_diagrams draws
    original = report.reliability_diagram

    def spy(stats, path=None, **options):
        drawn.append((stats, options.get("ax"), options.get("count_ax")))
        return original(stats, path, **options)

    monkeypatch.setattr(report, "reliability_diagram", spy)
    stats = {"teacher": _binned(MIXED), "ce": _stats(), "hinton": _binned({4: (300, 0.5, 0.45)})}
    results = {"config": {"seeds": 1}, "students": {"ce": {"label": "CE"}, "hinton": {"label": "Hinton KD"}}}
    overview, *_ = report.write_diagrams(stats, results, tmp_path)
    assert overview.name == "reliability.png" and overview.stat().st_size > 10_000
    in_overview = [(s, count_ax) for s, ax, count_ax in drawn if ax is not None]
    assert len(in_overview) == len(stats)
    for s, count_ax in in_overview:  # each model's rows per bin, bar by bar
        assert count_ax is not None, "the overview leaves out the rows per bin"
        heights = sorted(round(p.get_height()) for p in count_ax.patches)
        assert heights == sorted(s.bin_count[s.bin_count > 0].tolist())
    fig = in_overview[0][1].figure
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)  # one legend for all


def test_draws_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert fastkd.reliability_diagram(_stats(), ax=ax) is fig and len(fig.axes) == 1 and ax.patches
    fig = Figure()
    ax, count_ax = fig.subplots(2, 1)
    fastkd.reliability_diagram(_stats(), ax=ax, count_ax=count_ax, legend=False)
    assert count_ax.patches and ax.get_legend() is None and not fig.legends


def test_rejects_other_inputs():
    with pytest.raises(TypeError, match="stats must be CalibrationStats"):
        fastkd.reliability_diagram(torch.zeros(10))
