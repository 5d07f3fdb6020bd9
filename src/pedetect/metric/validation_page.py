"""The validation report on disk: ``DIR/report.json``, PNG figures and ``DIR/index.html``.

The page is static HTML with its figures beside it: it opens from ``file://`` in any browser, with
no network, no script and nothing fetched (docs/evaluation.md). Every file is written atomically;
``report.json`` last.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pedetect.io import atomic_path, write_json_atomic, write_text_atomic
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL
from pedetect.metric.froc import plot_froc
from pedetect.metric.validation import EXAM_PE, ValidationResult

REPORT_FILE = "report.json"
INDEX_FILE = "index.html"
ROC_FIGURE = "roc.png"
CALIBRATION_FIGURE = "calibration.png"
SUBGROUP_FIGURE = "subgroups.png"
FROC_FIGURE = "froc.png"
DPI = 80
PANELS: tuple[str, ...] = (EXAM_PE, IMAGE_LABEL) + EXAM_LABELS
TITLES = {EXAM_PE: "exam PE (max slice)", IMAGE_LABEL: "slices (pe_present_on_image)"}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: list[float] | None, digits: int = 3) -> str:
    return "n/a" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def _entry(report: dict[str, Any], name: str) -> dict[str, Any]:
    return report[EXAM_PE] if name == EXAM_PE else report["labels"][name]


def _probability_panel(axis, title: str, xlabel: str, ylabel: str) -> None:
    """A square panel of one rate against another, both on [0, 1] (a little room above 1)."""
    axis.set_title(title, fontsize=9)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_aspect("equal")
    axis.tick_params(labelsize=7)
    axis.set_xlabel(xlabel, fontsize=8)
    axis.set_ylabel(ylabel, fontsize=8)


def plot_roc(result: ValidationResult, path: Path) -> Path:
    """ROC curves of the exam-level decision, the slices and the nine exam labels, AUC and 95% CI in
    each title; the exam-level decision's operating points marked."""
    report = result.report
    figure = Figure(figsize=(13, 10), layout="constrained")
    axes = figure.subplots(3, 4).ravel()
    for axis, name in zip(axes, PANELS):
        entry = _entry(report, name)
        curve = result.roc.get(name)
        axis.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        if curve is None:
            axis.text(0.5, 0.5, "one class only:\nAUC undefined", ha="center", va="center", transform=axis.transAxes)
        else:
            axis.plot(curve["fpr"], curve["tpr"], color="tab:blue", lw=1.6, drawstyle="default")
        if name == EXAM_PE:
            for k, point in enumerate(entry["operating_points"]):
                if point["sensitivity"] is not None and point["specificity"] is not None:
                    axis.plot(
                        1 - point["specificity"],
                        point["sensitivity"],
                        "os^Dv"[k % 5],
                        ms=6,
                        label=f"{point['name']} (t={point['threshold']:.3g})",
                    )
            axis.legend(loc="lower right", fontsize=7)
        auc = "AUC undefined" if entry["auc"] is None else f"AUC {_fmt(entry['auc'])} {_ci(entry['auc_ci95'])}"
        _probability_panel(axis, f"{TITLES.get(name, name)}\n{auc}", "1 - specificity", "sensitivity")
    axes[-1].axis("off")
    boot = report["methods"]["bootstrap"]
    axes[-1].text(
        0.0,
        0.5,
        f"{report['n_studies']} studies, {report['n_slices']} slices\n"
        f"95% CI: bootstrap over studies,\n{boot['resamples']} resamples, seed {boot['seed']},\npercentile",
        fontsize=10,
        va="center",
    )
    figure.suptitle("ROC curves", fontsize=12)
    return _save(figure, path)


def plot_calibration(result: ValidationResult, path: Path) -> Path:
    """Reliability diagrams (observed frequency against mean predicted probability per bin, Wilson
    95% bars; bars below: the share of predictions in each bin) of the slices and the nine labels."""
    report = result.report
    figure = Figure(figsize=(13, 10), layout="constrained")
    axes = figure.subplots(3, 4).ravel()
    names = (IMAGE_LABEL,) + EXAM_LABELS
    for axis, name in zip(axes, names):
        cal = report["labels"][name]["calibration"]
        bins = cal["bins"]
        total = max(cal["n"], 1)
        lows = np.array([b["low"] for b in bins])
        width = bins[0]["high"] - bins[0]["low"]
        axis.bar(lows, [0.25 * b["count"] / total for b in bins], width=width, align="edge", color="0.85", lw=0)
        axis.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        shown = [b for b in bins if b["count"]]
        if shown:
            x = np.array([b["mean_predicted"] for b in shown])
            y = np.array([b["observed"] for b in shown])
            low = np.array([b["observed_ci95"][0] for b in shown])
            high = np.array([b["observed_ci95"][1] for b in shown])
            axis.errorbar(
                x,
                y,
                yerr=[np.maximum(y - low, 0), np.maximum(high - y, 0)],
                fmt="o-",
                color="tab:red",
                ms=4,
                lw=1.2,
                capsize=2,
            )
        _probability_panel(axis, f"{TITLES.get(name, name)}\nECE {_fmt(cal['ece'])}", "mean predicted", "observed")
    for axis in axes[len(names) :]:
        axis.axis("off")
    axes[-1].text(
        0.0,
        0.5,
        "10 equal-width bins on [0, 1]\nred: observed frequency (Wilson 95%)\ngrey bars: share of predictions\n(x 0.25)",
        fontsize=10,
        va="center",
    )
    figure.suptitle("Calibration (reliability diagrams)", fontsize=12)
    return _save(figure, path)


def plot_subgroups(report: dict[str, Any], path: Path) -> Path:
    """A forest plot: the exam-level AUROC and its 95% interval per subgroup, small groups hollow and grey."""
    subgroups = report["subgroups"]
    rows = []
    for field_name, table in subgroups["fields"].items():
        rows.append((field_name, None))
        rows += [(field_name, group) for group in table["groups"]]
    figure = Figure(figsize=(12, 1.2 + 0.24 * len(rows)), layout="constrained")
    axis = figure.subplots()
    labels = []
    for y, (field_name, group) in enumerate(rows):
        if group is None:
            labels.append(subgroups.get("titles", {}).get(field_name, field_name))
            continue
        labels.append(f"    {group['value']}  (n={group['studies']}, {group['positives']}+)")
        colour = "0.6" if group["small"] else "tab:blue"
        if group["auc_ci95"] is not None:
            axis.plot(group["auc_ci95"], [y, y], color=colour, lw=1.5)
        if group["auc"] is not None:
            axis.plot(group["auc"], y, "o", color=colour, mfc="white" if group["small"] else colour, ms=6, mew=1.5)
    overall = report[EXAM_PE]["auc"]
    if overall is not None:
        axis.axvline(overall, color="tab:blue", ls="--", lw=0.8, label=f"all studies {overall:.3f}")
        axis.legend(loc="lower left", fontsize=8)
    axis.set_yticks(range(len(rows)), labels, fontsize=8)
    for tick, (_, group) in zip(axis.get_yticklabels(), rows):
        if group is None:
            tick.set_fontweight("bold")
    axis.set_ylim(len(rows) - 0.5, -0.5)
    axis.set_xlim(0, 1.0)
    axis.axvline(0.5, color="grey", lw=0.6, ls=":")
    axis.set_xlabel("exam-level AUROC (max slice probability), 95% bootstrap CI")
    axis.set_title("Subgroups by the studies' headers (hollow grey: small group)", fontsize=10)
    axis.grid(True, axis="x", alpha=0.3)
    return _save(figure, path)


# ------------------------------------------------------------------------------------------- page

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto; max-width: 1280px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
td { white-space: nowrap; } td.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 10em; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; }
tr.small td { color: #888; font-style: italic; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #7a4a00; } code { background: #f4f4f4; padding: 0 0.2em; }
dl dt { font-weight: bold; } dl dd { margin: 0 0 0.5em 1.5em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(
    header: list[str], rows: list[list[str]], row_classes: list[str] | None = None, wrap_last: bool = False
) -> str:
    """An HTML table; the first column left-aligned, the last one wrapped with ``wrap_last`` (cells
    are escaped by the caller)."""
    head = "".join(f'<th class="name">{h}</th>' if k == 0 else f"<th>{h}</th>" for k, h in enumerate(header))
    body = []
    last = len(header) - 1
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(
            f'<td class="name">{c}</td>'
            if k == 0
            else f'<td class="wrap">{c}</td>'
            if wrap_last and k == last
            else f"<td>{c}</td>"
            for k, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _rate(entry: dict[str, Any], key: str) -> str:
    return "n/a" if entry[key] is None else f"{_fmt(entry[key])} {_ci(entry[f'{key}_ci95'])}"


def _auc(entry: dict[str, Any]) -> str:
    return "n/a" if entry["auc"] is None else f"{_fmt(entry['auc'])} {_ci(entry['auc_ci95'])}"


def render_index(report: dict[str, Any], figures: dict[str, str]) -> str:
    """The page: every table of the report and its figures (file names relative to the page)."""
    boot = report["methods"]["bootstrap"]
    pe = report[EXAM_PE]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>pedetect validation report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Validation report</h1>",
        f"<p>{report['n_studies']} studies, {report['n_slices']} slices. Labels <code>{_e(report['inputs']['labels'])}</code>, "
        f"submission <code>{_e(report['inputs']['submission'])}</code>. Created {_e(report['created'])}.</p>",
        f"<p>95% intervals: AUROC by bootstrap over studies ({boot['resamples']} resamples with replacement, seed "
        f"{boot['seed']}, percentile interval; for slices, each drawn study brings all its slices); proportions by "
        "Wilson's score interval. Figures in <code>report.json</code>.</p>",
    ]
    for note in report.get("notes", []):
        parts.append(f'<p class="note">Note: {_e(note)}</p>')

    parts.append("<h2>Competition metric</h2>")
    parts.append(
        _table(
            ["", "value"],
            [
                ["score (weighted log loss, lower is better)", _fmt(report["score"], 5)],
                ["image part", _fmt(report["image_part"], 5)],
                ["exam part", _fmt(report["exam_part"], 5)],
            ],
        )
    )

    parts.append("<h2>Exam-level PE decision</h2>")
    parts.append(
        f"<p>{_e(pe['definition'])}. {pe['positives']} positive and {pe['negatives']} negative studies. "
        f"AUROC <b>{_auc(pe)}</b>; "
        f"negative_exam_for_pe's AUROC (as the labels below) {_fmt(pe['negative_exam_for_pe_auc'])} "
        f"{_ci(pe['negative_exam_for_pe_auc_ci95'])}.</p>"
    )
    rows = []
    for p in pe["operating_points"]:
        calibrated = p.get("calibrated")
        if calibrated:
            chosen = (
                f"pedetect calibrate: sensitivity {_fmt(calibrated.get('sensitivity'))}, "
                f"specificity {_fmt(calibrated.get('specificity'))} where chosen"
            )
        else:
            chosen = "the challenge's rule"
        rows.append(
            [
                _e(p["name"]),
                f"{p['threshold']:.4g}",
                _rate(p, "sensitivity"),
                _rate(p, "specificity"),
                _rate(p, "ppv"),
                _rate(p, "npv"),
                f"{p['tp']} / {p['fp']} / {p['tn']} / {p['fn']}",
                _e(chosen),
            ]
        )
    parts.append(
        _table(
            ["operating point", "threshold", "sensitivity", "specificity", "PPV", "NPV", "TP / FP / TN / FN", "from"],
            rows,
            wrap_last=True,
        )
    )
    sources = sorted({p["source"] for p in pe["operating_points"] if p.get("calibrated")})
    if sources:
        parts.append(f"<p>Recorded operating points: {', '.join(f'<code>{_e(s)}</code>' for s in sources)}.</p>")

    parts.append("<h2>Per label</h2>")
    rows = []
    for name, entry in report["labels"].items():
        at = entry["at_threshold"]
        rows.append(
            [
                _e(name),
                _fmt(entry["auc"]),
                _ci(entry["auc_ci95"]),
                _fmt(entry["log_loss"], 4),
                f"{entry['positives']} / {entry['n']}",
                _rate(at, "sensitivity"),
                _rate(at, "specificity"),
                _rate(at, "ppv"),
                _rate(at, "npv"),
                _fmt(entry["calibration"]["ece"]),
            ]
        )
    parts.append(
        _table(
            [
                "label",
                "AUROC",
                "95% CI",
                "log loss",
                "positives / n",
                "sensitivity @0.5",
                "specificity @0.5",
                "PPV @0.5",
                "NPV @0.5",
                "ECE",
            ],
            rows,
        )
    )
    parts.append(
        "<p>Slices: n counts slices; their Wilson intervals treat slices as independent, which slices of one "
        "study are not (too narrow); the AUROC interval resamples studies. Decisions at 0.5 are the submission's "
        "values as given (after the label rules if the submission obeys them).</p>"
    )
    if "roc" in figures:
        parts.append(f'<h2>ROC curves</h2><img src="{_e(figures["roc"])}" alt="ROC curves of every label">')
    if "calibration" in figures:
        parts.append(
            f"<h2>Calibration</h2><p>{_e(report['methods']['calibration'])}.</p>"
            f'<img src="{_e(figures["calibration"])}" alt="Reliability diagrams">'
        )

    if "subgroups" in report:
        parts.append(_subgroups_html(report, figures))
    if "froc" in report:
        parts.append(_froc_html(report["froc"], figures))

    parts.append("<h2>Methods</h2><dl>")
    for key, value in report["methods"].items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {v}" for k, v in value.items())
        parts.append(f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>")
    parts.append("</dl></body></html>")
    return "\n".join(parts) + "\n"


def _subgroups_html(report: dict[str, Any], figures: dict[str, str]) -> str:
    sub = report["subgroups"]
    parts = [
        "<h2>Subgroups (from the studies' DICOM headers)</h2>",
        f"<p>DICOM <code>{_e(sub.get('dicom', ''))}</code>: {sub.get('files', 0)} files, {sub.get('studies_found', 0)} studies "
        f"found, {sub.get('unreadable_files', 0)} unreadable files, {sub.get('studies_without_dicom', 0)} studies of the labels "
        f"without DICOM. Exam-level PE decision per group; groups of fewer than {sub['small_below']} studies, or "
        "without positives or negatives, are <i>small</i> (grey): shown, not hidden, but their numbers say little.</p>",
    ]
    point_names = [p["name"] for p in report[EXAM_PE]["operating_points"]]
    parts.append(
        "<p>Se: sensitivity, Sp: specificity of the exam-level decision at each operating point, with Wilson 95% "
        "intervals.</p>"
    )
    for field_name, table in sub["fields"].items():
        title = sub.get("titles", {}).get(field_name, field_name)
        rows, classes = [], []
        for g in table["groups"]:
            row = [
                _e(g["value"]),
                str(g["studies"]),
                str(g["positives"]),
                str(g["negatives"]),
                _auc(g),
            ]
            for name in point_names:
                at = g["operating_points"][name]
                row.append(f"Se {_rate(at, 'sensitivity')}<br>Sp {_rate(at, 'specificity')}")
            row.append(_e(g["small_reason"]) if g["small"] else "")
            rows.append(row)
            classes.append("small" if g["small"] else "")
        header = ["group", "studies", "positive", "negative", "AUROC [95% CI]"]
        header += [f"@{_e(name)}" for name in point_names]
        header.append("small")
        parts.append(f"<h3>{_e(title)}</h3>" + _table(header, rows, classes, wrap_last=True))
    if "subgroups" in figures:
        parts.append(f'<img src="{_e(figures["subgroups"])}" alt="AUROC per subgroup">')
    return "\n".join(parts)


def _froc_html(froc: dict[str, Any], figures: dict[str, str]) -> str:
    parts = [
        "<h2>FROC (per embolus)</h2>",
        f"<p>{froc['scans']} scans (from {_e(froc['scans_from'])}), {froc['emboli']} emboli, {froc['candidates']} candidates "
        "(docs/localisation.md).</p>",
    ]
    rows = []
    for rule, numbers in froc["rules"].items():
        row = [_e(rule)] + [_fmt(v) for v in numbers["sensitivity"].values()] + [_fmt(numbers["mean_sensitivity"])]
        rows.append(row)
    header = ["hit rule"] + [f"sensitivity @{_e(k)} FP/scan" for k in next(iter(froc["rules"].values()))["sensitivity"]]
    parts.append(_table(header + ["mean"], rows))
    for note in froc.get("notes", []):
        parts.append(f'<p class="note">Note: {_e(note)}</p>')
    if "froc" in figures:
        parts.append(f'<img src="{_e(figures["froc"])}" alt="FROC">')
    return "\n".join(parts)


def write_report(result: ValidationResult, out: str | Path) -> dict[str, Path]:
    """Write the figures, ``index.html`` and ``report.json`` (last) into ``out``; their paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    written = {
        "roc": plot_roc(result, out / ROC_FIGURE),
        "calibration": plot_calibration(result, out / CALIBRATION_FIGURE),
    }
    if "subgroups" in report:
        written["subgroups"] = plot_subgroups(report, out / SUBGROUP_FIGURE)
    if "froc" in report:
        written["froc"] = plot_froc(report["froc"], out / FROC_FIGURE)
    report["figures"] = {name: path.name for name, path in written.items()}
    write_text_atomic(out / INDEX_FILE, render_index(report, report["figures"]))
    write_json_atomic(out / REPORT_FILE, report)
    written["index"] = out / INDEX_FILE
    written["report"] = out / REPORT_FILE
    return written
