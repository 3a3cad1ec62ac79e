"""The demo's report: a terminal table, ``report.md``, ``results.json`` and reliability diagrams (PNG).

The reading in ``report.md`` is written from the numbers: a difference between two methods' means is
called resolved only when it exceeds twice the combined seed spread, 2 sqrt(std_a^2 + std_b^2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fastkd.calibration import CalibrationStats
from fastkd.demo.experiment import METRICS
from fastkd.reliability import legend_entries, reliability_diagram

PERCENT = {"accuracy", "ece", "confidence", "agreement", "agreement_independent", "ece_scaled"}
COLUMNS = [  # (metric, header)
    ("accuracy", "accuracy"),
    ("ece", "ECE"),
    ("nll", "NLL"),
    ("agreement", "agree"),
    ("kl", "KL"),
    ("agreement_independent", "agree (indep.)"),
    ("temperature", "own T"),
    ("ece_scaled", "ECE at own T"),
]
# The teacher's row: its agreement and KL are with the independent teacher, its scaled ECE the calibrated one.
TEACHER_COLUMNS = {"agreement": "agreement_independent", "kl": "kl_independent", "agreement_independent": None,
                   "ece_scaled": "ece_calibrated"}  # fmt: skip
NAMES = {"accuracy": "accuracy", "ece": "ECE", "nll": "NLL"}
SMOKE_TEST = (
    "Smoke test (--quick): the models trained for a few steps, so these numbers say nothing about the "
    "methods. Run without --quick for results."
)


def _value(metric: str, value: float) -> str:
    return f"{100 * value:.1f}" if metric in PERCENT else f"{value:.3f}"


def _cell(result: dict, metric: str | None, shown_as: str) -> str:
    if metric is None:
        return ""
    mean, std = result["mean"][metric], result["std"][metric]
    return _value(shown_as, mean) if std is None else f"{_value(shown_as, mean)} ± {_value(shown_as, std)}"


def table_rows(results: dict) -> list[list[str]]:
    """Header, one row per student, then the teachers' (mean ± std over seeds)."""
    rows = [["model"] + [header for _, header in COLUMNS]]
    for student in results["students"].values():
        rows.append([student["label"]] + [_cell(student, m, m) for m, _ in COLUMNS])
    teacher = results["teacher"]
    rows.append(["teacher"] + [_cell(teacher, TEACHER_COLUMNS.get(m, m), m) for m, _ in COLUMNS])
    return rows


def terminal_table(results: dict) -> str:
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def _compare(a: dict, b: dict, metrics: tuple[str, ...] = ("accuracy", "ece", "nll")) -> str:
    """a's mean minus b's on each metric, marked resolved when beyond twice the combined seed spread."""
    parts = []
    for metric in metrics:
        diff = a["mean"][metric] - b["mean"][metric]
        std_a, std_b = a["std"][metric], b["std"][metric]
        note = "" if std_a is None else " (resolved)" if abs(diff) > 2 * math.hypot(std_a, std_b) else " (within noise)"
        amount = f"{100 * diff:+.1f} points" if metric in PERCENT else f"{diff:+.3f}"
        parts.append(f"{NAMES[metric]} {amount}{note}")
    return ", ".join(parts)


def _teacher_reading(results: dict, stats: dict[str, CalibrationStats]) -> str:
    teacher = results["teacher"]
    m, s, runs = teacher["mean"], teacher["std"], teacher["runs"]
    pooled, pooled_after = stats["teacher"], stats["teacher_calibrated"]
    if s["ece"] is None:
        ece_change = "from one teacher"
    else:
        resolved = abs(m["ece_calibrated"] - m["ece"]) > 2 * math.hypot(s["ece"], s["ece_calibrated"])
        ece_change = "resolved" if resolved else "within the seed spread"
    n = len(runs)
    side = "over" if m["confidence"] > m["accuracy"] else "under"
    above = sum(run["temperature"] > 1 for run in runs)
    ece_fell = sum(run["ece_calibrated"] < run["ece"] for run in runs)
    nll_fell = sum(run["nll_calibrated"] < run["nll"] for run in runs)
    return (
        f"**Teachers.** They fit their train split ({100 * m['train_accuracy']:.1f}% accuracy) and reach "
        f"{100 * m['accuracy']:.1f}% on the test split with a mean confidence of {100 * m['confidence']:.1f}%: "
        f"{side}-confident on average. `fit_temperature` found T > 1 for {above} of {n} teachers (mean "
        f"T = {m['temperature']:.3f}). Scaled by it, the test ECE fell for {ece_fell} of {n} (mean "
        f"{100 * m['ece']:.2f}% -> {100 * m['ece_calibrated']:.2f}%) and the test NLL for {nll_fell} of {n} (mean "
        f"{m['nll']:.4f} -> {m['nll_calibrated']:.4f}); accuracy is unchanged, as a temperature keeps the argmax. "
        f"T minimizes the NLL, not the ECE. With {results['data']['test']} test rows at this accuracy, about "
        f"{round((1 - m['accuracy']) * results['data']['test'])} per teacher are errors, so the binned ECE rests "
        f"on few of them: the change in its mean is {ece_change}, and over the {pooled.count} test predictions of "
        f"all teachers pooled (the diagrams) it goes {100 * pooled.ece():.2f}% -> {100 * pooled_after.ece():.2f}%."
    )


def _confidence_reading(students: dict) -> str | None:
    off = {key: s for key, s in students.items() if abs(s["mean"]["confidence"] - s["mean"]["accuracy"]) > 0.05}
    if not off:
        return None
    described = "; ".join(
        f"{s['label']} is {'over' if s['mean']['confidence'] > s['mean']['accuracy'] else 'under'}-confident "
        f"(mean confidence {100 * s['mean']['confidence']:.1f}% at {100 * s['mean']['accuracy']:.1f}% accuracy), "
        f"and scaled by its own fitted T = {s['mean']['temperature']:.3f} its ECE is {100 * s['mean']['ece_scaled']:.2f}%"
        for s in off.values()
    )
    why = ""
    if off.keys() & {"standardized", "spherical"}:
        why = (
            " The normalized-logit objectives constrain the student's logits in the KD term only up to their "
            "scale, which leaves the scale to the CE term on the labeled rows."
        )
    return f"**Confidence.** {described}.{why}"


def reading(results: dict, stats: dict[str, CalibrationStats]) -> list[str]:
    """Statements about the numbers (``stats``: the pooled reliability statistics), a paragraph each."""
    students = results["students"]
    ce = students["ce"]
    kd = {key: s for key, s in students.items() if key != "ce"}
    lines = [_teacher_reading(results, stats)]
    lines.append(
        f"**Distillation against CE alone.** The CE student sees only the {results['data']['labeled']} labeled "
        "rows; the distilled ones also see the teacher's logits on every train row. Mean differences from CE "
        "only: " + "; ".join(f"{s['label']}: {_compare(s, ce)}" for s in kd.values()) + "."
    )
    if {"calibrated", "hinton"} <= students.keys():
        lines.append(
            "**Calibrated teacher against Hinton KD** (KD at each teacher's fitted T instead of T = 4): "
            f"{_compare(students['calibrated'], students['hinton'])}."
        )
    confidence = _confidence_reading(students)
    if confidence:
        lines.append(confidence)
    control = results["teacher"]["mean"]["agreement_independent"]
    own = [s["mean"]["agreement"] for s in kd.values()]
    other = [s["mean"]["agreement_independent"] for s in kd.values()]
    relation = "below" if max(own) < control else "not below"
    lines.append(
        f"**Fidelity.** The distilled students agree with their teacher's top-1 on {100 * min(own):.1f}-"
        f"{100 * max(own):.1f}% of the test inputs (the CE student: {100 * ce['mean']['agreement']:.1f}%), and with "
        f"an independently trained teacher on {100 * min(other):.1f}-{100 * max(other):.1f}%. Two teachers of the "
        f"same recipe agree on {100 * control:.1f}%: the best student's agreement with its own teacher is {relation} "
        "that."
    )
    return lines


def diagram_title(key: str, results: dict) -> str:
    seeds = results["config"]["seeds"]
    pooled = f"{seeds} seeds pooled" if seeds > 1 else "1 seed"
    if key == "teacher":
        return f"teacher, T = 1 ({pooled})"
    if key == "teacher_calibrated":
        return f"teacher, fitted T ({pooled})"
    return f"{results['students'][key]['label']} ({pooled})"


def write_diagrams(stats: dict[str, CalibrationStats], results: dict, out: Path, each: bool = True) -> list[Path]:
    """``reliability.png`` with every model's diagram and rows per bin side by side, then (``each``) one
    PNG per model."""
    from matplotlib.figure import Figure

    columns = min(4, len(stats))
    rows = math.ceil(len(stats) / columns)
    fig = Figure(figsize=(4 * columns, 5.2 * rows + 0.4), layout="constrained")
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[3, 1] * rows)
    for i, (key, s) in enumerate(stats.items()):
        row, column = divmod(i, columns)
        ax = fig.add_subplot(grid[2 * row, column])
        count_ax = fig.add_subplot(grid[2 * row + 1, column], sharex=ax)
        reliability_diagram(s, ax=ax, count_ax=count_ax, title=diagram_title(key, results), legend=False)
    fig.legend(*legend_entries(), loc="outside lower center", ncols=4)  # one legend, under every diagram
    paths = [out / "reliability.png"]
    fig.savefig(paths[0], dpi=100)
    for key, s in stats.items() if each else ():
        paths.append(out / f"reliability_{key}.png")
        reliability_diagram(s, paths[-1], title=diagram_title(key, results))
    return paths


def _teacher_table(teacher: dict) -> str:
    header = "| teacher | accuracy | ECE | NLL | Brier | mean confidence |\n|---|---|---|---|---|---|"
    lines = [header]
    for name, suffix in (("T = 1", ""), ("fitted T", "_calibrated")):
        cells = [_cell(teacher, metric + suffix, metric) for metric in ("accuracy", "ece", "nll", "brier", "confidence")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _objective(objective: str | dict) -> str:
    if isinstance(objective, str):
        return objective
    keywords = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in objective["KDLoss"].items())
    return f"KDLoss({keywords})"


def markdown(results: dict, stats: dict[str, CalibrationStats], figures: list[Path]) -> str:
    cfg, d, teacher, env = results["config"], results["data"], results["teacher"], results["environment"]
    first = next(iter(results["students"].values()))
    fitted = ", ".join(f"{run['temperature']:.3f} ({run['passes']} passes)" for run in teacher["runs"])
    objectives = "\n".join(f"- {s['label']}: `{_objective(s['runs'][0]['objective'])}`" for s in results["students"].values())
    quick = cfg.get("quick", False)
    sections = [
        "# fastkd demo: distillation and calibration" + (" (smoke test)" if quick else ""),
        *([f"**{SMOKE_TEST}** They are listed only to show that every part ran; no reading is given."] if quick else []),
        f"Data set **{d['name']}**: {d['train']} train rows ({d['labeled']} of them labeled for the students), "
        f"{d['calibration']} calibration rows, {d['test']} test rows (a fixed split). Per seed, a teacher (a CNN of "
        f"{teacher['parameters']:,} parameters, {_epochs(cfg['teacher_epochs'])}) and students (an MLP of "
        f"{first['parameters']:,} parameters, {_epochs(cfg['epochs'])}); {cfg['seeds']} seeds, mean ± sample std. "
        f"{env['device']}; fastkd {env['fastkd']}, torch {env['torch']}; {results['seconds']:.0f} s on {env['date']}.",
        "## Teacher calibration (test split)",
        _teacher_table(teacher),
        f"`fastkd.fit_temperature` on the {d['calibration']} calibration rows, per teacher: T = {fitted}.",
        "## Students (test split)",
        markdown_table(table_rows(results)),
        "Accuracy, ECE and agreement in percent. "
        + "; ".join(f"**{header}**: {METRICS[m]}" for m, header in COLUMNS)
        + ". In the teacher row, agree and KL are with the next seed's teacher (the fidelity control) and ECE "
        "at own T is the calibrated teacher's.",
        "Objectives (`fastkd.KDLoss` keywords, seed 0; the calibrated temperature and the spherical radius are "
        "each seed's teacher's). The CE term applies only to labeled rows:\n\n" + objectives,
        *([] if quick else [
            "## Reading",
            "\n\n".join(reading(results, stats)),
            "A difference between methods is called resolved when it exceeds twice the combined seed spread "
            "2·sqrt(std_a² + std_b²).",
        ]),
        "## Reliability diagrams",
        "Bars: accuracy per confidence bin; hatched, the gap to the bin's mean confidence: red above the bar "
        "(over-confident), amber inside it (under-confident); the dashed diagonal is perfect calibration; under "
        "each diagram, the rows per bin (log scale). Each diagram pools the test predictions of every seed.\n\n"
        + "\n\n".join(f"![{p.stem}]({p.name})" for p in figures),
    ]
    return "\n\n".join(sections) + "\n"


def write(results: dict, stats: dict[str, CalibrationStats], out: Path) -> dict[str, Path | list[Path]]:
    """Write ``results.json``, the PNGs and ``report.md`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    figures = write_diagrams(stats, results, out, each=not results["config"].get("quick"))  # quick: the overview
    json_path, md_path = out / "results.json", out / "report.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown(results, stats, figures))
    return {"report": md_path, "json": json_path, "figures": figures}
