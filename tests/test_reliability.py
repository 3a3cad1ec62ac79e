"""reliability_diagram: the figure is written and holds one accuracy bar and one gap bar per filled bin."""

from __future__ import annotations

import pytest
import torch

import fastkd

matplotlib = pytest.importorskip("matplotlib")


def _stats():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 4
    target = torch.randint(0, 10, (500,), generator=g)
    return fastkd.calibration_stats(logits, target, n_bins=10, backend="torch")


def test_writes_png_with_bars(tmp_path):
    stats = _stats()
    path = tmp_path / "reliability.png"
    fig = fastkd.reliability_diagram(stats, path=path, title="random logits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    diagram, histogram = fig.axes
    filled = int((stats.bin_count > 0).sum())
    assert filled >= 5 and len(diagram.patches) == 2 * filled  # accuracy and gap bars
    heights = sorted(round(p.get_height(), 9) for p in diagram.patches[:filled])
    assert heights == sorted(round(a, 9) for a in stats.bin_accuracy[stats.bin_count > 0].tolist())
    assert len(histogram.patches) == stats.n_bins
    assert "ECE" in diagram.get_legend().get_title().get_text()


def test_draws_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert fastkd.reliability_diagram(_stats(), ax=ax) is fig and len(fig.axes) == 1 and ax.patches


def test_rejects_other_inputs():
    with pytest.raises(TypeError, match="stats must be CalibrationStats"):
        fastkd.reliability_diagram(torch.zeros(10))
