"""Benchmark results as markdown tables, JSON and PNG plots, stamped with device, versions and commit."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from benchmarks.cases import CASES

BYTES_NOTE = {
    "softmax": "5 N V b (read x, write y; read y and dy, write dx)",
    "kd_loss": "3 N V b (read student and teacher, write the gradient)",
    "jsd": "3 N V b (read student and teacher, write the gradient)",
    "skew_kl": "3 N V b (read student and teacher, write the gradient)",
    "tvd": "3 N V b (read student and teacher, write the gradient)",
    "ece": "N V b (read the logits)",
    "fit_temperature": "N V b (one read of the logits, the least any method needs)",
    "fidelity": "2 N V b (read the student's and the teacher's logits)",
    "fused_linear": "3 (N + V) H b (read the hidden states and weights, write dL/dh and dL/dW; no logits: the "
    "case is bound by its matmuls, its GB/s are not a bandwidth figure; read it for time and peak memory)",
}


def _ms(record: dict) -> str:
    if "median_ms" not in record:
        return record["status"]
    return f"{record['median_ms']:.3g}"


def _baseline_cell(record: dict) -> str:
    if "median_ms" not in record:
        return record["status"]
    cell = f"{record['median_ms']:.3g} ({record['speedup']:.2f}x)" if "speedup" in record else f"{record['median_ms']:.3g}"
    if record.get("peak_bytes") is not None:
        cell += f", {record['peak_bytes'] / 2**20:.0f} MiB"
    return cell + _fitted(record)


def _fitted(record: dict) -> str:
    """The temperature a fit reached: a faster fit that stops short is no faster fit."""
    return f", T = {record['value']:.3f}" if record["case"] == "fit_temperature" and record.get("value") else ""


def tables(results: dict) -> str:
    """One markdown table per case: fastkd's time, GB/s, % of copy bandwidth and peak memory, then each
    baseline's time with fastkd's speedup over it (its time / fastkd's) and, where measured, its peak
    memory."""
    by_case: dict[str, dict[tuple, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for record in results["records"]:
        by_case[record["case"]][(record["dtype"], record["rows"], record["width"])][record["impl"]] = record
    env = results["environment"]
    out = [
        f"# fastkd benchmarks: {env['device']}",
        f"{env['date']}; torch {env['torch']}, triton {env['triton']}, fastkd {env['fastkd']}, commit {env['commit']}; "
        f"fastkd ran {env['backend']}. Copy bandwidth measured in this run: {env['copy_bandwidth_gbps']:.1f} GB/s "
        "(read + write). Times are medians in ms (20th-80th percentile in the JSON); GB/s counts the bytes that "
        "must move; % copy is that rate over the copy bandwidth; (Nx) is fastkd's speedup over the baseline.",
    ]
    for name, shapes in by_case.items():
        impls = list(CASES[name].impls)
        baselines = impls[1:]
        out.append(f"## {CASES[name].title}\n\nBytes that must move: {BYTES_NOTE[name]}.")
        header = ["dtype", "rows x width", "fastkd ms", "GB/s", "% copy", "peak MiB"] + [f"{b} ms" for b in baselines]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (dtype, rows, width), records in shapes.items():
            f = records["fastkd"]
            gbps = f"{f['gbps']:.1f}" if "gbps" in f else ""
            pct = f"{f['pct_of_copy']:.0f}%" if "pct_of_copy" in f else ""
            peak = f"{f['peak_bytes'] / 2**20:.0f}" if f.get("peak_bytes") is not None else "n/a"
            cells = [dtype, f"{rows} x {width}", _ms(f) + _fitted(f), gbps, pct, peak] + [_baseline_cell(records[b]) for b in baselines]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


COLORS = {"fastkd": "#C44E52", "eager": "#4C72B0", "compiled": "#55A868", "liger": "#8172B2",
          "torchmetrics": "#CCB974", "plain": "#64B5CD", "lbfgs": "#8C8C8C", "materialized": "#DD8452"}  # fmt: skip


def plot(results: dict, path: Path) -> None:
    """Time and GB/s per shape (sorted by width), per case: a line per implementation and dtype (solid
    bfloat16, dashed float32), fastkd in red; the dotted line is the measured copy bandwidth. For a case
    about memory (``Case.about_memory``) the second panel is each implementation's peak memory."""
    from matplotlib.figure import Figure

    shapes: dict[str, set[tuple[int, int]]] = defaultdict(set)
    series: dict[str, dict[tuple[str, str], dict]] = defaultdict(lambda: defaultdict(dict))
    for r in results["records"]:
        if "median_ms" in r:
            shapes[r["case"]].add((r["width"], r["rows"]))
            second = r["gbps"]
            if CASES[r["case"]].about_memory:  # NaN (no point) where it was not measured (CPU quick runs)
                second = r["peak_bytes"] / 2**20 if r.get("peak_bytes") is not None else math.nan
            series[r["case"]][(r["impl"], r["dtype"])][(r["width"], r["rows"])] = (r["median_ms"], second)
    fig = Figure(figsize=(11, 3.3 * len(series)), layout="constrained")
    axes = fig.subplots(len(series), 2, squeeze=False)
    for (time_ax, rate_ax), (name, lines) in zip(axes, series.items()):
        order = sorted(shapes[name])
        for (impl, dtype), points in lines.items():
            xs = [i for i, shape in enumerate(order) if shape in points]
            style = {"marker": "o", "color": COLORS.get(impl), "linestyle": "-" if dtype == "bfloat16" else "--",
                     "label": f"{impl} {dtype}", "linewidth": 2 if impl == "fastkd" else 1.2}  # fmt: skip
            time_ax.plot(xs, [points[order[i]][0] for i in xs], **style)
            rate_ax.plot(xs, [points[order[i]][1] for i in xs], **style)
        about_memory = CASES[name].about_memory
        if not about_memory:
            rate_ax.axhline(results["environment"]["copy_bandwidth_gbps"], color="0.4", linewidth=1, linestyle=":",
                            label="copy bandwidth")  # fmt: skip
        labels = [f"{rows}x{width}" for width, rows in order]
        second = "peak MiB (one call, beyond its inputs)" if about_memory else "GB/s (bytes that must move)"
        for ax, ylabel in ((time_ax, "median ms"), (rate_ax, second)):
            ax.set(yscale="log", ylabel=ylabel, xticks=range(len(order)))
            ax.set_xticklabels(labels, fontsize=8)
        time_ax.set_title(CASES[name].title, fontsize=10)
        rate_ax.set_title(f"{name}: {'peak memory' if about_memory else 'effective bandwidth'}", fontsize=10)
        rate_ax.legend(fontsize=7, ncol=2)
    env = results["environment"]
    fig.suptitle(f"fastkd benchmarks: {env['device']}, commit {env['commit']}, {env['date']}")
    fig.savefig(path, dpi=100)


def stem(results: dict) -> str:
    env = results["environment"]
    device = "cpu" if env["device"].startswith("CPU") else env["device"]
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return f"{slug}-{env['date'][:10]}" + ("-quick" if env["quick"] else "")


def write(results: dict, out: Path) -> dict[str, Path]:
    """``<device>-<date>.md``, ``.json`` and ``.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / stem(results)
    paths = {"md": base.with_suffix(".md"), "json": base.with_suffix(".json"), "png": base.with_suffix(".png")}
    paths["md"].write_text(tables(results))
    paths["json"].write_text(json.dumps(results, indent=2, default=lambda v: None if math.isnan(v) else v) + "\n")
    plot(results, paths["png"])
    return paths
