"""Per-embolus FROC: how many emboli the candidates of ``pedetect predict --clots`` find, against
how many false positives per scan they cost (docs/localisation.md, "Scoring: FROC").

The truth is one row per embolus and slice (``pedetect synth``'s clots.csv): the embolus's box on
that slice. A candidate is a scored point on a key slice. A candidate *hits* an embolus by a named
rule (:data:`RULES`); candidates are taken by score, highest first, and at each threshold an embolus
is found when any candidate at or above it hits it (found once), a candidate that hits no embolus is
a false positive, and one that hits only emboli already found is neither (as in LUNA16 and CAD-PE).

When the truth has a ``visible`` column (synth's clots.csv: 1 where a reader sees the embolus on the
slice, 0 where it is drawn but not visible, docs/synthetic_visibility.md), only the visible rows are
the truth: an embolus visible on no slice is not scored, and the hit test uses only the slices where
an embolus is visible. A candidate that hits nothing visible but a row that is not visible is neither
found nor a false positive (as LUNA16 ignores hits on its "irrelevant findings", nodules under 3 mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pedetect.io import atomic_path
from pedetect.labels import SERIES, STUDY
from pedetect.metric.submission import MAX_SHOWN, InputError

RATES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # FP per scan at which sensitivity is reported
GROWTH = 3  # pixels the box grows by in neighbour_box3
NEIGHBOUR = 1  # slices a candidate's key slice may be away from one of the embolus's slices
RULES: dict[str, str] = {
    "neighbour_box3": (
        f"the candidate's key slice is one of the embolus's slices or next to one (|slice_index - s| <= {NEIGHBOUR}) "
        f"and its point lies in the embolus's box on that slice s grown by {GROWTH} pixels"
    ),
    "point_in_box": (
        "the candidate's point lies in the embolus's own box on the candidate's key slice itself "
        "(the nearest this box-only truth comes to CAD-PE's 'marker within the embolus')"
    ),
}
DEFAULT_RULE = "neighbour_box3"
SIDES: tuple[str, ...] = ("central", "left", "right")
SIZE_BUCKETS: tuple[str, ...] = ("<9", "9-25", ">25")  # pixels on the embolus's largest slice
SCANS_FROM_LABELS = "labels"
SCANS_FROM_FILES = "truth+candidates"

BOX = ("row_min", "row_max", "col_min", "col_max")
VISIBLE = "visible"  # optional truth column: 1 where a reader sees the embolus on the slice, 0 where not
CLOT_INTEGERS: tuple[str, ...] = ("embolus", "slice_index") + BOX + ("pixels",)
CLOT_COLUMNS: tuple[str, ...] = (STUDY, SERIES) + CLOT_INTEGERS + ("side",)
CANDIDATE_COLUMNS: tuple[str, ...] = (STUDY, SERIES, "candidate", "score", "slice_index", "row", "col")


def rate_key(rate: float) -> str:
    """A rate as a JSON key: ``0.5`` → ``"0.5"``, ``1.0`` → ``"1"``."""
    return f"{rate:g}"


def size_bucket(pixels: int) -> str:
    """The size bucket of an embolus with ``pixels`` pixels on its largest slice."""
    return "<9" if pixels < 9 else ("9-25" if pixels <= 25 else ">25")


# ----------------------------------------------------------------------------------------------- input


def _shown(values) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:MAX_SHOWN])
    return shown + (f" and {len(values) - MAX_SHOWN} more" if len(values) > MAX_SHOWN else "")


def _csv(path: str | Path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{what} file {path} is not a readable CSV: {error}") from None
    frame.attrs["source"] = str(path)
    return frame


def _source(frame: pd.DataFrame, default: str) -> str:
    return str(frame.attrs.get("source", default))


def _require(frame: pd.DataFrame, columns: Sequence[str], source: str, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(
            f"{what} file {source} lacks column(s) {', '.join(missing)}; it has: {', '.join(map(str, frame.columns))}"
        )


def _numbers(frame: pd.DataFrame, column: str, source: str, *, integer: bool, low=None, high=None) -> np.ndarray:
    text = frame[column]
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= np.isfinite(values) & (values != np.round(values))
    if low is not None:
        bad |= values < low
    if high is not None:
        bad |= values > high
    if bad.any():
        kind = "integers" if integer else "numbers"
        limits = "" if low is None and high is None else f" in [{low}, {high if high is not None else 'inf'}]"
        lines = np.flatnonzero(bad)[:MAX_SHOWN]
        examples = ", ".join(f"line {k + 2}: {str(text.iloc[k])!r}" for k in lines)
        raise InputError(
            f"{source}: column '{column}' has {int(bad.sum())} value(s) that are not {kind}{limits}, e.g. {examples}"
        )
    return values.astype(np.int64) if integer else values


def validate_clots(frame: pd.DataFrame) -> pd.DataFrame:
    """The truth with its columns checked and parsed (integers for the numbers, strings for the UIDs)."""
    source = _source(frame, "clots")
    _require(frame, CLOT_COLUMNS, source, "clots")
    out = pd.DataFrame({STUDY: frame[STUDY].astype(str), SERIES: frame[SERIES].astype(str)})
    for column in CLOT_INTEGERS:
        out[column] = _numbers(frame, column, source, integer=True, low=0 if column != "embolus" else 1)
    out["side"] = frame["side"].astype(str)
    if "level" in frame.columns:  # optional: a main-artery embolus's side may be named central (side_right)
        out["level"] = frame["level"].astype(str)
    if VISIBLE in frame.columns:  # optional: only the visible rows are scored (:func:`visible_truth`)
        out[VISIBLE] = _numbers(frame, VISIBLE, source, integer=True, low=0, high=1)
    for low, high in (("row_min", "row_max"), ("col_min", "col_max")):
        bad = out[low] > out[high]
        if bad.any():
            lines = ", ".join(str(k + 2) for k in np.flatnonzero(bad.to_numpy())[:MAX_SHOWN])
            raise InputError(f"{source}: {int(bad.sum())} row(s) have {low} > {high}, e.g. line(s) {lines}")
    per_embolus = out.groupby([STUDY, "embolus"], sort=False)[[SERIES, "side"]].nunique()
    varying = per_embolus[(per_embolus > 1).any(axis=1)]
    if len(varying):
        named = [f"{study} embolus {number}" for study, number in varying.index]
        raise InputError(
            f"{source}: the series or side differ between the rows of {len(named)} embolus(es): {_shown(named)}"
        )
    out.attrs["source"] = source
    return out


def validate_candidates(frame: pd.DataFrame) -> pd.DataFrame:
    """The candidates with their columns checked and parsed (the other columns are dropped)."""
    source = _source(frame, "candidates")
    _require(frame, CANDIDATE_COLUMNS, source, "candidates")
    out = pd.DataFrame({STUDY: frame[STUDY].astype(str), SERIES: frame[SERIES].astype(str)})
    out["candidate"] = _numbers(frame, "candidate", source, integer=True, low=1)
    out["score"] = _numbers(frame, "score", source, integer=False, low=0, high=1)
    out["slice_index"] = _numbers(frame, "slice_index", source, integer=True, low=0)
    out["row"] = _numbers(frame, "row", source, integer=False)
    out["col"] = _numbers(frame, "col", source, integer=False)
    if "side" in frame.columns:  # optional: scored by side_agreement when present
        out["side"] = frame["side"].astype(str)
    out.attrs["source"] = source
    return out.reset_index(drop=True)


def read_clots(path: str | Path) -> pd.DataFrame:
    """``pedetect synth``'s clots.csv (one row per embolus and slice), checked: :func:`validate_clots`."""
    return validate_clots(_csv(path, "clots"))


def read_candidates(path: str | Path) -> pd.DataFrame:
    """``pedetect predict --clots``'s candidates (one row per candidate), checked: :func:`validate_candidates`."""
    return validate_candidates(_csv(path, "candidates"))


def read_scan_studies(path: str | Path) -> list[str]:
    """The studies (scans) of a labels file in train.csv columns: its distinct StudyInstanceUIDs, in file order."""
    frame = _csv(path, "labels")
    _require(frame, (STUDY,), str(path), "labels")
    return list(dict.fromkeys(frame[STUDY]))


# ----------------------------------------------------------------------------------------------- scoring


# pedetect synth's clot levels, proximal first (main: the trunk and the main arteries).
LEVELS: tuple[str, ...] = ("main", "lobar", "segmental", "subsegmental")


def exam_sensitivity_by_level(
    truth: pd.DataFrame, negative_probability: dict[str, float], *, decision: float = 0.5
) -> dict[str, dict[str, int]]:
    """Positive exams found at the exam decision, by the level of their most proximal visible clot.

    ``truth``: a validated clot truth with a ``level`` column (only its visible rows count:
    :func:`visible_truth`); ``negative_probability``: each study's predicted ``negative_exam_for_pe``
    (a study is found when it is below ``decision``). A study with no visible clot is not counted.
    Returns ``{level: {"found": k, "exams": n}}`` in :data:`LEVELS` order, then any other level seen.
    """
    if "level" not in truth.columns:
        raise InputError(f"{truth.attrs.get('source', 'the clot truth')}: no 'level' column to group the exams by")
    shown, _ = visible_truth(truth)
    rank = {level: k for k, level in enumerate(LEVELS)}
    levels = shown[[STUDY, "level"]].assign(rank=shown["level"].map(lambda v: rank.get(v, len(LEVELS))))
    proximal = levels.sort_values(["rank", "level"]).drop_duplicates(STUDY)
    missing = sorted(set(proximal[STUDY]) - set(negative_probability))
    if missing:
        raise InputError(
            f"no negative_exam_for_pe prediction for {len(missing)} positive study(ies): {_shown(missing)}"
        )
    result: dict[str, dict[str, int]] = {}
    for level in [*LEVELS, *sorted(set(proximal["level"]) - set(LEVELS))]:
        studies = proximal.loc[proximal["level"] == level, STUDY]
        found = sum(negative_probability[s] < decision for s in studies)
        result[level] = {"found": int(found), "exams": len(studies)}
    return result


def _emboli(truth: pd.DataFrame) -> pd.DataFrame:
    """One row per embolus (study, embolus): its series, side, largest slice's pixels and size bucket."""
    extra = {"level": ("level", "first")} if "level" in truth.columns else {}
    emboli = truth.groupby([STUDY, "embolus"], sort=True).agg(
        series=(SERIES, "first"),
        side=("side", "first"),
        pixels=("pixels", "max"),
        slices=("slice_index", "nunique"),
        **extra,
    )
    emboli = emboli.reset_index()
    emboli["size"] = [size_bucket(int(p)) for p in emboli["pixels"]]
    return emboli


def hits(truth: pd.DataFrame, candidates: pd.DataFrame, rule: str = DEFAULT_RULE) -> pd.DataFrame:
    """Every (candidate row, embolus row) pair where the candidate hits the embolus by ``rule``:
    columns ``candidate_row`` (row of ``candidates``) and ``embolus_row`` (row of :func:`_emboli`'s
    table, the emboli sorted by study and number). Inputs as :func:`validate_clots` and
    :func:`validate_candidates` return them."""
    if rule not in RULES:
        raise ValueError(f"unknown hit rule {rule!r}; the rules are: {', '.join(RULES)}")
    numbered = _emboli(truth)[[STUDY, "embolus"]]
    rows = truth.merge(numbered.assign(embolus_row=np.arange(len(numbered))), on=[STUDY, "embolus"])
    cand = candidates[[STUDY, SERIES, "slice_index", "row", "col"]].assign(candidate_row=np.arange(len(candidates)))
    pairs = cand.merge(rows, on=[STUDY, SERIES], suffixes=("", "_truth"))
    grow, reach = (GROWTH, NEIGHBOUR) if rule == "neighbour_box3" else (0, 0)
    inside = (
        ((pairs["slice_index"] - pairs["slice_index_truth"]).abs() <= reach)
        & (pairs["row"] >= pairs["row_min"] - grow)
        & (pairs["row"] <= pairs["row_max"] + grow)
        & (pairs["col"] >= pairs["col_min"] - grow)
        & (pairs["col"] <= pairs["col_max"] + grow)
    )
    found = pairs.loc[inside, ["candidate_row", "embolus_row"]].drop_duplicates()
    return found.sort_values(["candidate_row", "embolus_row"]).reset_index(drop=True)


def visible_truth(truth: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows scored, the rows set aside) of a validated truth: with a ``visible`` column, its rows
    with 1 and those with 0 (an embolus visible on no slice has only rows set aside); without, all
    rows and none."""
    if VISIBLE not in truth.columns:
        return truth, truth.iloc[:0]
    shown = truth[VISIBLE].to_numpy() == 1
    kept, aside = truth[shown].reset_index(drop=True), truth[~shown].reset_index(drop=True)
    kept.attrs.update(truth.attrs)
    return kept, aside


def _ignored(truth: pd.DataFrame, aside: pd.DataFrame, candidates: pd.DataFrame, rule: str) -> np.ndarray:
    """Rows of ``candidates`` that hit, by ``rule``, a row set aside (not visible) and no row of the
    truth scored: neither found nor false positive."""
    if len(aside) == 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    hidden = set(hits(aside, candidates, rule)["candidate_row"])
    shown = set(hits(truth, candidates, rule)["candidate_row"]) if len(truth) else set()
    return np.array(sorted(hidden - shown), dtype=np.int64)


def _scan_set(truth: pd.DataFrame, candidates: pd.DataFrame, studies: Sequence[str] | None) -> tuple[list[str], str]:
    named = list(dict.fromkeys(list(truth[STUDY]) + list(candidates[STUDY])))
    if studies is None:
        return named, SCANS_FROM_FILES
    scans = list(dict.fromkeys(str(s) for s in studies))
    known = set(scans)
    for frame, what in ((candidates, "candidates"), (truth, "clots")):
        outside = [s for s in dict.fromkeys(frame[STUDY]) if s not in known]
        if outside:
            raise InputError(
                f"{_source(frame, what)}: {len(outside)} study(ies) are not among the {len(scans)} scans "
                f"of the labels: {_shown(outside)}"
            )
    return scans, SCANS_FROM_LABELS


def _operating_points(found_at: np.ndarray, fp_at: np.ndarray, n_scans: int) -> dict[float, int]:
    """Curve index per rate: the highest threshold that reaches the highest sensitivity whose FP/scan is
    at most the rate. Index 0 is "no candidate taken"; index k ≥ 1 takes the scores ≥ the k-th highest."""
    points = {}
    for rate in RATES:
        allowed = int(np.searchsorted(fp_at, rate * n_scans, side="right")) - 1  # fp_at is non-decreasing
        points[rate] = int(np.searchsorted(found_at, found_at[allowed], side="left"))
    return points


def _sensitivity(found: np.ndarray | int, total: int):
    if total == 0:
        return None if np.ndim(found) == 0 else [None] * len(np.asarray(found))
    return float(found) / total if np.ndim(found) == 0 else (np.asarray(found) / total).tolist()


def _score_rule(truth, candidates, emboli, scans: list[str], rule: str) -> dict[str, Any]:
    pairs = hits(truth, candidates, rule)
    n_scans, n_emboli = len(scans), len(emboli)
    scores = candidates["score"].to_numpy(dtype=np.float64)
    thresholds = np.unique(scores)[::-1]  # distinct scores, highest first: ties are one threshold
    # Threshold index of each candidate, 1-based: index k takes the candidates with score >= thresholds[k-1].
    level = np.searchsorted(-thresholds, -scores, side="left") + 1
    hitting = np.zeros(len(candidates), dtype=bool)
    hitting[pairs["candidate_row"].to_numpy()] = True
    n_levels = len(thresholds) + 1
    fp_at = np.cumsum(np.bincount(level[~hitting], minlength=n_levels))
    first = np.full(n_emboli, n_levels, dtype=np.int64)  # level at which each embolus is first found
    np.minimum.at(first, pairs["embolus_row"].to_numpy(), level[pairs["candidate_row"].to_numpy()])
    found_at = np.cumsum(np.bincount(first, minlength=n_levels + 1)[:n_levels])

    # The curve: one point per threshold, runs of equal (FP, found) kept once at their highest threshold.
    keep = np.ones(n_levels, dtype=bool)
    keep[1:] = (np.diff(fp_at) != 0) | (np.diff(found_at) != 0)
    kept = np.flatnonzero(keep)

    def threshold_of(k: int) -> float | None:
        return None if k == 0 else float(thresholds[k - 1])

    points = _operating_points(found_at, fp_at, n_scans)
    keys = [rate_key(r) for r in RATES]

    def group(column: str, names: Sequence[str]) -> dict[str, Any]:
        values = emboli[column].to_numpy()
        out = {}
        for name in list(names) + sorted(set(values) - set(names)):
            members = first[values == name]
            found_in = np.cumsum(np.bincount(members, minlength=n_levels + 1)[:n_levels])
            out[name] = {
                "emboli": len(members),
                "sensitivity": {
                    key: _sensitivity(int(found_in[points[r]]), len(members)) for key, r in zip(keys, RATES)
                },
                "found": {key: int(found_in[points[r]]) for key, r in zip(keys, RATES)},
                "curve_sensitivity": _sensitivity(found_in[kept], len(members)) if len(members) else None,
            }
        return out

    sensitivity = {key: _sensitivity(int(found_at[points[r]]), n_emboli) for key, r in zip(keys, RATES)}
    side_agreement = (
        {key: _side_agreement(pairs, level, candidates, emboli, points[r]) for key, r in zip(keys, RATES)}
        if "side" in candidates.columns
        else None
    )
    return {
        "rule": rule,
        "description": RULES[rule],
        "sensitivity": sensitivity,
        "mean_sensitivity": None if n_emboli == 0 else float(np.mean(list(sensitivity.values()))),
        "true_positives": {key: int(found_at[points[r]]) for key, r in zip(keys, RATES)},
        "false_positives": {key: int(fp_at[points[r]]) for key, r in zip(keys, RATES)},
        "thresholds": {key: threshold_of(points[r]) for key, r in zip(keys, RATES)},
        "candidates_hitting": int(hitting.sum()),
        "by_side": group("side", SIDES),
        "by_size": group("size", SIZE_BUCKETS),
        "side_agreement": side_agreement,
        "curve": {
            "threshold": [threshold_of(int(k)) for k in kept],
            "fp_per_scan": (fp_at[kept] / n_scans).tolist(),
            "sensitivity": _sensitivity(found_at[kept], n_emboli),
        },
    }


def side_right(candidate_side: str, embolus_side: str, embolus_level: str = "") -> bool:
    """Whether a candidate names an embolus's side: the same side, or central for an embolus in a main
    pulmonary artery (the challenge labels such an embolus central and its side)."""
    return candidate_side == embolus_side or (embolus_level == "main" and candidate_side == "central")


def _side_agreement(pairs: pd.DataFrame, level: np.ndarray, candidates, emboli, point: int) -> dict[str, Any]:
    """Of the emboli found at curve index ``point``, how many the strongest candidate hitting each puts
    on the embolus's side (:func:`side_right`)."""
    taken = pairs.assign(level=level[pairs["candidate_row"].to_numpy()])
    taken = taken[taken["level"] <= point].sort_values(["embolus_row", "level", "candidate_row"])
    first = taken.drop_duplicates("embolus_row")
    sides = candidates["side"].astype(str).to_numpy()
    levels = emboli["level"].astype(str).to_numpy() if "level" in emboli.columns else np.full(len(emboli), "")
    right = sum(
        side_right(sides[c], str(emboli["side"].iat[e]), levels[e])
        for c, e in zip(first["candidate_row"], first["embolus_row"])
    )
    found = len(first)
    return {"found": found, "side_right": int(right), "fraction": None if not found else right / found}


def froc_report(
    truth: pd.DataFrame,
    candidates: pd.DataFrame,
    studies: Sequence[str] | None = None,
    rules: Sequence[str] = tuple(RULES),
) -> dict[str, Any]:
    """The FROC of ``candidates`` against ``truth`` by each rule of ``rules``: the counts shared by all
    rules at the top, each rule's numbers (as :func:`froc` gives them) under ``rules``.

    ``studies``: the scans (for FP per scan), e.g. the StudyInstanceUIDs of the labels; a study of
    the truth or the candidates outside them is an :class:`InputError`. ``None``: the studies named in
    the truth or the candidates (a scan with neither is then not counted; a note says so).
    """
    truth = validate_clots(truth)
    candidates = validate_candidates(candidates)
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"unknown hit rule {rule!r}; the rules are: {', '.join(RULES)}")
    scans, scans_from = _scan_set(truth, candidates, studies)  # every study of the truth is a scan, visible or not
    truth, aside = visible_truth(truth)
    if not scans:
        raise InputError(
            "no scans to score: the truth and the candidates are empty and no labels name the studies (give --labels)"
        )
    emboli = _emboli(truth)
    notes = []
    ignored = {rule: _ignored(truth, aside, candidates, rule) for rule in rules}
    if VISIBLE in truth.columns:
        hidden = aside.drop_duplicates([STUDY, "embolus"]).merge(
            emboli[[STUDY, "embolus"]], on=[STUDY, "embolus"], how="left", indicator=True
        )
        nowhere = int((hidden["_merge"] == "left_only").sum())
        notes.append(
            f"the truth's visible column: scored the {len(emboli)} emboli visible on at least one slice, on their "
            f"{len(truth)} visible rows; set aside {nowhere} embolus(es) visible on no slice and {len(aside)} "
            "row(s) where an embolus is not visible; candidates that hit only those are neither found nor false "
            "positives: " + ", ".join(f"{rule} {len(rows)}" for rule, rows in ignored.items())
        )
    if scans_from == SCANS_FROM_FILES:
        notes.append(
            f"the scans are the {len(scans)} studies named in the truth or the candidates: a study with neither "
            "an embolus nor a candidate is not counted, so FP per scan may be too high (give the labels)"
        )
    if len(emboli) == 0:
        notes.append("the truth has no embolus: sensitivity is undefined (null)")
    if len(candidates) == 0 and len(emboli):
        notes.append("there are no candidates: sensitivity is 0 at every rate")
    return {
        "scans": len(scans),
        "scans_from": scans_from,
        "emboli": len(emboli),
        "candidates": len(candidates),
        "rates": list(RATES),
        "mean_over": "sensitivity at 0.5, 1, 2 and 4 FP/scan (LUNA16's CPM averages 7 rates, 1/8 to 8)",
        "emboli_by_side": {name: int((emboli["side"] == name).sum()) for name in SIDES},
        "emboli_by_size": {name: int((emboli["size"] == name).sum()) for name in SIZE_BUCKETS},
        "notes": notes,
        "rules": {rule: _score_rule(truth, _without(candidates, ignored[rule]), emboli, scans, rule) for rule in rules},
    }


def _without(candidates: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """``candidates`` less the given rows (renumbered from 0, as the scoring expects)."""
    if len(rows) == 0:
        return candidates
    kept = candidates.drop(index=candidates.index[rows]).reset_index(drop=True)
    kept.attrs.update(candidates.attrs)
    return kept


def froc(
    truth: pd.DataFrame,
    candidates: pd.DataFrame,
    studies: Sequence[str] | None = None,
    rule: str = DEFAULT_RULE,
) -> dict[str, Any]:
    """The per-embolus FROC by one hit rule, as a JSON-serialisable dict: :func:`froc_report`'s shared
    counts and that rule's numbers in one level (keys in docs/localisation.md)."""
    report = froc_report(truth, candidates, studies, rules=(rule,))
    rules = report.pop("rules")
    return {**report, **rules[rule]}


# ----------------------------------------------------------------------------------------------- output


def format_froc(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`froc_report`'s report (or of one rule's :func:`froc`)."""

    def number(value) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    rules = report.get("rules") or {report["rule"]: report}
    lines = [
        f"FROC per embolus: {report['scans']} scans (from {report['scans_from']}), {report['emboli']} emboli, "
        f"{report['candidates']} candidates"
    ]
    main_name, main = next(iter(rules.items()))
    sides, sizes = list(main["by_side"]), list(main["by_size"])
    lines.append(f"rule {main_name}: {main['description']}")
    header = f"{'FP/scan':>7} {'threshold':>9} {'found':>9} {'FP':>5} {'sens':>6} "
    header += " ".join(f"{name:>7}" for name in sides) + "  " + " ".join(f"{name:>6}" for name in sizes)
    lines.append(header)
    for key in main["sensitivity"]:
        threshold = main["thresholds"][key]
        row = f"{key:>7} {'none' if threshold is None else f'{threshold:.3f}':>9} {main['true_positives'][key]:>4}/{report['emboli']:<4}"
        row += f" {main['false_positives'][key]:>5} {number(main['sensitivity'][key]):>6} "
        row += " ".join(f"{number(main['by_side'][n]['sensitivity'][key]):>7}" for n in sides) + "  "
        row += " ".join(f"{number(main['by_size'][n]['sensitivity'][key]):>6}" for n in sizes)
        lines.append(row)

    def counts(group: dict[str, Any]) -> str:
        return ", ".join(f"{name} {value['emboli']}" for name, value in group.items())

    lines.append(
        f"{'emboli':>7} {'':>9} {'':>9} {'':>5} {'':>6} " + counts(main["by_side"]) + "; " + counts(main["by_size"])
    )
    lines.append(f"mean sensitivity (0.5, 1, 2, 4 FP/scan): {number(main['mean_sensitivity'])}")
    if main.get("side_agreement"):
        agreement = main["side_agreement"]
        lines.append(
            "side right (of the emboli found, by the strongest candidate on each): "
            + ", ".join(f"{key} FP/scan {value['side_right']}/{value['found']}" for key, value in agreement.items())
        )
    for name, other in list(rules.items())[1:]:
        values = " / ".join(number(v) for v in other["sensitivity"].values())
        lines.append(
            f"rule {name}: sensitivity at {' / '.join(other['sensitivity'])} FP/scan {values}; "
            f"mean {number(other['mean_sensitivity'])}"
        )
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


X_LIMITS = (0.125, 8.0)


def _step(axis, fp_per_scan: list[float], sensitivity: list[float | None], **style) -> None:
    """A FROC as a step line on a log axis: FP 0 drawn just off the left edge, the last point held to the right edge."""
    if not sensitivity or sensitivity[0] is None:
        return
    x = [max(v, X_LIMITS[0] / 4) for v in fp_per_scan] + [X_LIMITS[1] * 2]
    y = list(sensitivity) + [sensitivity[-1]]
    axis.step(x, y, where="post", **style)


def plot_froc(result: dict[str, Any], path: str | Path) -> Path:
    """Write the FROC figure of :func:`froc_report` (a curve per rule, and per side for the first rule)
    or of one rule's :func:`froc` (overall and per side) as a PNG; log FP/scan from 1/8 to 8, the
    four rates marked."""
    from matplotlib.figure import Figure  # matplotlib only for evaluate --plot

    rules = result.get("rules") or {result["rule"]: result}
    main_name, main = next(iter(rules.items()))
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    by_rule, by_side = figure.subplots(1, 2, sharey=True)
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    dashes = ("-", "--", "-.", ":")
    for k, (name, numbers) in enumerate(rules.items()):
        colour, dash = colours[k % len(colours)], dashes[k % len(dashes)]
        curve = numbers["curve"]
        mean = numbers["mean_sensitivity"]
        label = f"{name} (mean {mean:.3f})" if mean is not None else name
        _step(by_rule, curve["fp_per_scan"], curve["sensitivity"], color=colour, ls=dash, lw=1.8, label=label)
        marks = list(numbers["sensitivity"].values())
        if marks[0] is not None:
            by_rule.plot(result["rates"], marks, "o", color=colour, ms=5)
    curve = main["curve"]
    _step(by_side, curve["fp_per_scan"], curve["sensitivity"], color="black", lw=1.8, label=f"all ({result['emboli']})")
    for colour, (name, group) in zip(colours[2:], main["by_side"].items()):
        if group["emboli"]:
            _step(
                by_side,
                curve["fp_per_scan"],
                group["curve_sensitivity"],
                color=colour,
                lw=1.4,
                label=f"{name} ({group['emboli']})",
            )
            by_side.plot(result["rates"], list(group["sensitivity"].values()), "o", color=colour, ms=4)
    for axis, title in ((by_rule, "per hit rule"), (by_side, f"per side ({main_name})")):
        axis.set_xscale("log", base=2)
        axis.set_xlim(*X_LIMITS)
        axis.set_ylim(0, 1.02)
        axis.set_xticks([0.125, 0.25, 0.5, 1, 2, 4, 8], ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
        for rate in result["rates"]:
            axis.axvline(rate, color="grey", ls=":", lw=0.8)
        axis.set_xlabel("false positives per scan")
        axis.set_title(title, fontsize=10)
        axis.grid(True, axis="y", alpha=0.3)
        if result["emboli"] == 0:
            axis.text(0.5, 0.5, "no emboli in the truth", ha="center", transform=axis.transAxes)
        else:
            axis.legend(loc="lower right", fontsize=8)
    by_rule.set_ylabel("sensitivity (per embolus)")
    figure.suptitle(
        f"FROC: {result['emboli']} emboli, {result['scans']} scans (from {result['scans_from']}), "
        f"{result['candidates']} candidates",
        fontsize=11,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    return path
