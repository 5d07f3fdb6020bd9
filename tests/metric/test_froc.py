"""Per-embolus FROC (pedetect.metric.froc, ``pedetect evaluate --clots --candidates``): the hit rules,
the counting, the rates, the breakdowns, the command and its errors, on hand-made tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers.metric import cand, clot, frames, make_labels, make_submission, six_candidates_over_three_scans, write
from pedetect.labels import SERIES, STUDY
from pedetect.metric.froc import (
    exam_sensitivity_by_level,
    froc,
    froc_report,
    hits,
    plot_froc,
    read_candidates,
    read_clots,
    validate_clots,
)
from pedetect.metric.submission import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# An embolus of study A on slices 10 and 11; its box is rows 20-24, columns 30-34 on both.
TWO_SLICES = [clot("A", 1, 10, (20, 24, 30, 34)), clot("A", 1, 11, (20, 24, 30, 34))]


def hit_by(rule: str, truth_rows, candidate_rows) -> list[int]:
    """The candidates (row numbers) that hit some embolus by ``rule``."""
    return sorted(set(hits(*frames(truth_rows, candidate_rows), rule)["candidate_row"]))


class TestHitRule:
    def test_a_point_on_the_emboluss_own_slice_hits(self):
        candidates = [cand("A", 1, 0.9, 10, 22.0, 32.0), cand("A", 2, 0.8, 11, 20.0, 34.0)]  # centre; corner
        assert hit_by("neighbour_box3", TWO_SLICES, candidates) == [0, 1]
        assert hit_by("point_in_box", TWO_SLICES, candidates) == [0, 1]
        result = froc(*frames(TWO_SLICES, candidates[:1]))
        assert result["sensitivity"] == {"0.5": 1.0, "1": 1.0, "2": 1.0, "4": 1.0}

    def test_a_point_on_a_neighbour_slice_hits_by_neighbour_box3_only(self):
        candidates = [cand("A", 1, 0.9, 9, 22.0, 32.0), cand("A", 2, 0.8, 12, 22.0, 32.0)]
        assert hit_by("neighbour_box3", TWO_SLICES, candidates) == [0, 1]
        assert hit_by("point_in_box", TWO_SLICES, candidates) == []

    def test_two_slices_away_misses(self):
        candidates = [cand("A", 1, 0.9, 8, 22.0, 32.0), cand("A", 2, 0.8, 13, 22.0, 32.0)]
        assert hit_by("neighbour_box3", TWO_SLICES, candidates) == []
        result = froc(*frames(TWO_SLICES, candidates), studies=["A"])
        assert result["curve"]["fp_per_scan"] == [0.0, 1.0, 2.0] and result["curve"]["sensitivity"] == [0, 0, 0]
        # The operating point of each rate is the highest threshold reaching its best sensitivity: none here.
        assert result["true_positives"]["4"] == 0 and result["false_positives"]["4"] == 0
        assert result["thresholds"]["4"] is None

    def test_three_pixels_outside_the_box_hits_four_misses(self):
        one_slice = [clot("A", 1, 10, (20, 24, 30, 34))]
        inside = [(27.0, 32.0), (17.0, 32.0), (22.0, 37.0), (22.0, 27.0), (27.0, 37.0)]  # 3 px out: rows, cols, corner
        outside = [(28.0, 32.0), (16.0, 32.0), (22.0, 38.0), (22.0, 26.0), (27.5, 32.0)]  # 4 px (or 3.5) out
        candidates = [cand("A", k + 1, 0.5, 10, r, c) for k, (r, c) in enumerate(inside + outside)]
        assert hit_by("neighbour_box3", one_slice, candidates) == [0, 1, 2, 3, 4]
        # Without growth only the box itself counts: none of these.
        assert hit_by("point_in_box", one_slice, candidates) == []

    def test_another_series_or_study_misses(self):
        truth, candidates = frames(TWO_SLICES, [cand("A", 1, 0.9, 10, 22.0, 32.0), cand("B", 1, 0.8, 10, 22.0, 32.0)])
        candidates.loc[0, SERIES] = "A.other"
        assert hits(truth, candidates).empty


def test_duplicate_hits_count_once_and_are_not_false_positives():
    truth, candidates = frames(
        TWO_SLICES,
        [cand("A", 1, 0.9, 10, 22.0, 32.0), cand("A", 2, 0.8, 11, 23.0, 33.0), cand("A", 3, 0.7, 40, 5.0, 5.0)],
    )
    result = froc(truth, candidates, studies=["A"])
    assert result["candidates_hitting"] == 2
    assert result["true_positives"]["4"] == 1 and result["thresholds"]["4"] == 0.9
    # The duplicate (0.8) moves neither count: its point is merged into the one at 0.9.
    assert result["curve"] == {"threshold": [None, 0.9, 0.7], "fp_per_scan": [0.0, 0.0, 1.0], "sensitivity": [0, 1, 1]}


def test_sensitivity_at_each_rate_computed_by_hand():
    result = froc(*six_candidates_over_three_scans(), studies=["A", "B", "C"])
    assert (result["scans"], result["emboli"], result["candidates"]) == (3, 4, 6)
    # FP after each threshold: 0, 1, 1, 2, 3, 3 over 3 scans; emboli found: 1, 1, 2, 2, 2, 3 of 4.
    # 0.5 FP/scan allows 1.5 FPs: down to 0.8 (1 FP), 2 found. 1 FP/scan allows 3: all, 3 found.
    assert result["sensitivity"] == {"0.5": 0.5, "1": 0.75, "2": 0.75, "4": 0.75}
    assert result["true_positives"] == {"0.5": 2, "1": 3, "2": 3, "4": 3}
    assert result["false_positives"] == {"0.5": 1, "1": 3, "2": 3, "4": 3}
    assert result["thresholds"] == {"0.5": 0.8, "1": 0.5, "2": 0.5, "4": 0.5}
    assert result["mean_sensitivity"] == pytest.approx((0.5 + 3 * 0.75) / 4)
    curve = result["curve"]
    assert curve["threshold"] == [None, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert curve["fp_per_scan"] == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    assert curve["sensitivity"] == [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75]


def test_per_side_and_per_size_at_the_overall_thresholds():
    result = froc(*six_candidates_over_three_scans(), studies=["A", "B", "C"])
    side, size = result["by_side"], result["by_size"]
    assert {name: group["emboli"] for name, group in side.items()} == {"central": 1, "left": 2, "right": 1}
    assert {name: group["emboli"] for name, group in size.items()} == {"<9": 1, "9-25": 2, ">25": 1}
    # At 0.5 FP/scan (threshold 0.8) A#1 and B#1 are found; from 1 FP/scan A#2 as well.
    assert side["central"]["sensitivity"] == {"0.5": 1.0, "1": 1.0, "2": 1.0, "4": 1.0}
    assert side["left"]["sensitivity"] == {"0.5": 0.0, "1": 0.5, "2": 0.5, "4": 0.5}
    assert side["right"]["sensitivity"]["0.5"] == 1.0
    assert size["<9"]["sensitivity"]["0.5"] == 1.0
    assert size["9-25"]["sensitivity"] == {"0.5": 0.5, "1": 1.0, "2": 1.0, "4": 1.0}
    assert size[">25"]["sensitivity"] == {"0.5": 0.0, "1": 0.0, "2": 0.0, "4": 0.0}
    assert side["left"]["curve_sensitivity"] == [0, 0, 0, 0, 0, 0, 0.5]


def test_point_in_box_is_reported_beside_the_main_rule():
    report = froc_report(*six_candidates_over_three_scans(), studies=["A", "B", "C"])
    assert list(report["rules"]) == ["neighbour_box3", "point_in_box"]
    # By point_in_box the 0.5 candidate (slice 31, next to A#2's slice 30) misses: an FP, A#2 not found.
    strict = report["rules"]["point_in_box"]
    assert strict["sensitivity"] == {"0.5": 0.5, "1": 0.5, "2": 0.5, "4": 0.5}
    assert strict["curve"]["fp_per_scan"][-1] == pytest.approx(4 / 3)


def test_false_positives_per_scan_count_the_negative_scans_of_the_labels():
    truth, candidates = frames(
        TWO_SLICES, [cand("A", 1, 0.9, 10, 22.0, 32.0), cand("A", 2, 0.8, 50, 1.0, 1.0), cand("B", 1, 0.7, 5, 1.0, 1.0)]
    )
    # Four scans (C and D have neither an embolus nor a candidate): 2 FPs are 0.5 per scan.
    with_labels = froc(truth, candidates, studies=["A", "B", "C", "D"])
    assert with_labels["scans"] == 4 and with_labels["scans_from"] == "labels"
    assert with_labels["curve"]["fp_per_scan"] == [0.0, 0.0, 0.25, 0.5]
    assert with_labels["false_positives"]["0.5"] == 0  # sensitivity 1 is reached before any FP
    # Without the labels only A and B are known: 1 FP per scan, and a note says why.
    alone = froc(truth, candidates)
    assert alone["scans"] == 2 and alone["scans_from"] == "truth+candidates"
    assert alone["curve"]["fp_per_scan"] == [0.0, 0.0, 0.5, 1.0]
    assert any("not counted" in note for note in alone["notes"])


def test_only_the_visible_emboli_and_rows_of_the_truth_are_scored():
    """synth's clots.csv marks where a reader sees each embolus (visible 1/0): an embolus visible on no
    slice is not scored, the hit test uses only the visible rows, and a candidate that hits nothing
    but a row that is not visible is neither found nor a false positive."""
    rows = [
        clot("A", 1, 10, (20, 24, 30, 34)) | {"visible": 1},
        clot("A", 1, 11, (20, 24, 30, 34)) | {"visible": 1},
        clot("A", 1, 12, (60, 61, 70, 71), pixels=2) | {"visible": 0},  # a sliver at its end, elsewhere
        clot("A", 2, 40, (100, 101, 100, 101), pixels=2) | {"visible": 0},  # visible nowhere
        clot("B", 1, 5, (50, 54, 50, 54)) | {"visible": 1},
    ]
    candidates = [
        cand("A", 1, 0.9, 10, 22.0, 32.0),  # A#1 on a visible slice: found
        cand("A", 2, 0.8, 40, 100.0, 100.0),  # on A#2, which no reader sees: ignored
        cand("A", 3, 0.7, 12, 60.0, 70.0),  # on A#1's row that is not visible: ignored
        cand("B", 1, 0.6, 30, 5.0, 5.0),  # nothing: a false positive
    ]
    truth = pd.DataFrame(rows)
    cands = pd.DataFrame(candidates, columns=list(cand("A", 1, 0.5, 0, 0.0, 0.0)))
    report = froc_report(truth, cands, studies=["A", "B"])
    assert report["emboli"] == 2 and report["emboli_by_side"]["left"] == 2  # A#1 and B#1
    for rule in ("neighbour_box3", "point_in_box"):
        scored = report["rules"][rule]
        assert scored["true_positives"]["4"] == 1 and scored["sensitivity"]["4"] == 0.5, rule
        # 0.8 and 0.7 are neither found nor false: the curve steps from 0.9 (A#1) to 0.6 (one FP).
        assert scored["curve"] == {
            "threshold": [None, 0.9, 0.6],
            "fp_per_scan": [0.0, 0.0, 0.5],
            "sensitivity": [0.0, 0.5, 0.5],
        }, rule
    note = next(n for n in report["notes"] if "visible column" in n)
    assert "set aside 1 embolus(es) visible on no slice and 2 row(s)" in note
    assert "neighbour_box3 2, point_in_box 2" in note
    # The size bucket comes from the visible rows (A#1: 12 pixels, not its 2-pixel end).
    assert report["emboli_by_size"] == {"<9": 0, "9-25": 2, ">25": 0}
    # Without the column every row is the truth: three emboli, the 0.8 and 0.7 candidates hit.
    everything = froc_report(truth.drop(columns=["visible"]), cands, studies=["A", "B"])
    assert everything["emboli"] == 3 and not any("visible column" in n for n in everything["notes"])
    assert everything["rules"]["point_in_box"]["true_positives"]["4"] == 2
    # A value other than 0 or 1 is an error that names the column.
    bad = truth.astype({"visible": object})
    bad.loc[0, "visible"] = "yes"
    with pytest.raises(InputError, match="'visible'"):
        froc_report(bad, cands)


def test_ties_in_score_are_one_threshold():
    truth_rows = [clot("A", 1, 10, (20, 24, 30, 34)), clot("B", 1, 10, (20, 24, 30, 34))]
    candidate_rows = [
        cand("A", 1, 0.9, 10, 22.0, 32.0),  # finds A#1
        cand("A", 2, 0.8, 60, 0.0, 0.0),  # FP
        cand("B", 1, 0.8, 60, 0.0, 0.0),  # FP
        cand("B", 2, 0.8, 10, 22.0, 32.0),  # finds B#1, at the same score
    ]
    truth, candidates = frames(truth_rows, candidate_rows)
    result = froc(truth, candidates, studies=["A", "B"])
    # Taking 0.8 takes all three: 2 FPs over 2 scans = 1 per scan. No order of the tie gives B#1 at 0.5.
    assert result["curve"]["threshold"] == [None, 0.9, 0.8]
    assert result["curve"]["fp_per_scan"] == [0.0, 0.0, 1.0]
    assert result["sensitivity"] == {"0.5": 0.5, "1": 1.0, "2": 1.0, "4": 1.0}
    for seed in range(3):  # the order of the rows does not matter
        shuffled = froc(truth, candidates.sample(frac=1, random_state=seed), studies=["A", "B"])
        assert shuffled["sensitivity"] == result["sensitivity"] and shuffled["curve"] == result["curve"]


def test_no_candidates_and_no_emboli(tmp_path):
    truth, candidates = frames(TWO_SLICES, [])
    empty = froc(truth, candidates, studies=["A", "B"])
    assert empty["sensitivity"] == {"0.5": 0.0, "1": 0.0, "2": 0.0, "4": 0.0} and empty["mean_sensitivity"] == 0.0
    truth, candidates = frames([], [cand("A", 1, 0.9, 10, 22.0, 32.0)])
    negative = froc(truth, candidates, studies=["A"])
    assert negative["sensitivity"] == {"0.5": None, "1": None, "2": None, "4": None}
    assert negative["mean_sensitivity"] is None and negative["emboli"] == 0
    assert any("no embolus" in note for note in negative["notes"])
    json.dumps(negative)
    plot_froc(negative, tmp_path / "negative.png")  # a figure that says so, not an error
    assert (tmp_path / "negative.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_candidate_outside_the_scans_is_an_error():
    truth, candidates = frames(TWO_SLICES, [cand("Z", 1, 0.9, 10, 22.0, 32.0)])
    with pytest.raises(InputError, match="not among the 2 scans.*'Z'"):
        froc(truth, candidates, studies=["A", "B"])


# ----------------------------------------------------------------------------------------------- files, command


@pytest.fixture
def files(tmp_path):
    """The six-candidate case as clots.csv and candidates.csv, with labels for scans A, B, C and a
    submission for them."""
    truth, candidates = six_candidates_over_three_scans()
    labels = make_labels({"A": [1, 0], "B": [1, 0], "C": [0, 0]}, {"C": {"negative_exam_for_pe": 1}})
    submission = make_submission(labels, lambda sop: 0.5, lambda study, label: 0.5)
    return {
        "clots": write(truth, tmp_path / "clots.csv"),
        "candidates": write(candidates, tmp_path / "candidates.csv"),
        "labels": write(labels, tmp_path / "labels.csv"),
        "submission": write(submission, tmp_path / "sub.csv"),
    }


def test_read_files_round_trip(files):
    truth, candidates = read_clots(files["clots"]), read_candidates(files["candidates"])
    assert froc(truth, candidates, ["A", "B", "C"])["sensitivity"]["0.5"] == 0.5


def test_command_text(cli, files):
    result = cli(
        "evaluate", "--clots", files["clots"], "--candidates", files["candidates"], "--labels", files["labels"]
    )
    assert result.exit_code == 0, result.output
    assert "3 scans (from labels), 4 emboli, 6 candidates" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["0.5"])
    assert line.split()[:5] == ["0.5", "0.800", "2/4", "1", "0.500"]
    assert "mean sensitivity (0.5, 1, 2, 4 FP/scan): 0.688" in result.stdout
    assert "rule point_in_box" in result.stdout and "warning" not in result.stderr


def test_command_json_with_the_metric_and_the_plot(cli, files, tmp_path):
    plot = tmp_path / "froc.png"
    result = cli(
        "evaluate",
        *("--labels", files["labels"], "--submission", files["submission"]),
        *("--clots", files["clots"], "--candidates", files["candidates"]),
        *("--json", "--plot", plot),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["score"] == pytest.approx(0.693147, abs=1e-5)  # every prediction 0.5: ln 2
    froc_part = report["froc"]
    assert froc_part["scans"] == 3 and froc_part["rules"]["neighbour_box3"]["sensitivity"]["1"] == 0.75
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == PNG_SIGNATURE


def test_command_without_labels_warns(cli, files):
    result = cli("evaluate", "--clots", files["clots"], "--candidates", files["candidates"], "--json")
    assert result.exit_code == 0, result.output
    # Scans A, B and C are all named by the files here, so the numbers do not change.
    assert json.loads(result.stdout)["froc"]["scans_from"] == "truth+candidates"
    assert "warning: no --labels" in result.stderr


class TestCommandErrors:
    def test_clots_without_candidates(self, cli, files):
        result = cli("evaluate", "--clots", files["clots"], "--labels", files["labels"])
        assert result.exit_code == 2 and "--clots needs --candidates" in result.stderr

    def test_neither_pair(self, cli, files):
        result = cli("evaluate", "--labels", files["labels"])
        assert result.exit_code == 2 and "--clots and --candidates" in result.stderr

    @pytest.mark.parametrize(("which", "column"), [("clots", "row_max"), ("candidates", "score")])
    def test_missing_column_names_the_file_and_the_column(self, cli, files, which, column):
        path = files[which]
        pd.read_csv(path).drop(columns=[column]).to_csv(path, index=False)
        result = cli("evaluate", "--clots", files["clots"], "--candidates", files["candidates"])
        assert result.exit_code == 2, result.output
        assert f"{which} file {path} lacks column(s) {column}" in result.stderr

    def test_a_score_outside_0_1(self, cli, files):
        frame = pd.read_csv(files["candidates"])
        frame.loc[2, "score"] = 1.5
        frame.to_csv(files["candidates"], index=False)
        result = cli("evaluate", "--clots", files["clots"], "--candidates", files["candidates"])
        assert result.exit_code == 2 and "column 'score'" in result.stderr and "line 4: '1.5'" in result.stderr

    def test_a_candidate_study_outside_the_labels(self, cli, files, tmp_path):
        labels = pd.read_csv(files["labels"])
        write(labels[labels[STUDY] != "C"], tmp_path / "labels_ab.csv")
        result = cli(
            "evaluate",
            "--clots",
            files["clots"],
            "--candidates",
            files["candidates"],
            "--labels",
            tmp_path / "labels_ab.csv",
        )
        assert result.exit_code == 2 and "candidates.csv: 1 study(ies) are not among the 2 scans" in result.stderr


def test_side_agreement_counts_the_strongest_hit_of_each_found_embolus():
    """Three emboli found, each by its strongest hitting candidate: a right one named right, a left one
    named central (wrong), a main-artery right one named central (right: the labels call it central too)."""
    truth_rows = [
        clot("A", 1, 5, (10, 12, 10, 12), side="right"),
        clot("A", 2, 5, (40, 42, 40, 42), side="left"),
        {**clot("A", 3, 8, (60, 62, 60, 62), side="right"), "level": "main"},
    ]
    sides = ["right", "central", "central", "left"]
    candidate_rows = [
        cand("A", 1, 0.9, 5, 11.0, 11.0),
        cand("A", 2, 0.8, 5, 41.0, 41.0),
        cand("A", 3, 0.7, 8, 61.0, 61.0),
        cand("A", 4, 0.6, 5, 11.0, 11.0),  # a weaker second hit on embolus 1 with another side: not counted
    ]
    for row, side in zip(candidate_rows, sides):
        row["side"] = side
    result = froc(*frames(truth_rows, candidate_rows), studies=["A"])
    assert result["side_agreement"]["2"] == {"found": 3, "side_right": 2, "fraction": pytest.approx(2 / 3)}


def test_exams_found_at_the_decision_by_their_most_proximal_visible_clot():
    rows = [
        clot("A", 1, 10, (20, 24, 30, 34)) | {"level": "subsegmental", "visible": 1},
        clot("A", 2, 12, (40, 50, 40, 50)) | {"level": "lobar", "visible": 1},  # A counts as lobar
        clot("B", 1, 5, (50, 54, 50, 54)) | {"level": "main", "visible": 0},  # a main clot no reader sees
        clot("B", 2, 6, (50, 54, 50, 54)) | {"level": "segmental", "visible": 1},
        clot("C", 1, 7, (50, 54, 50, 54)) | {"level": "segmental", "visible": 1},
        clot("D", 1, 7, (50, 54, 50, 54)) | {"level": "main", "visible": 0},  # visible nowhere: not counted
    ]
    truth = validate_clots(pd.DataFrame(rows))
    negative = {"A": 0.2, "B": 0.49, "C": 0.5, "D": 0.9, "E": 0.1}  # C at the decision is called negative
    assert exam_sensitivity_by_level(truth, negative) == {
        "main": {"found": 0, "exams": 0},
        "lobar": {"found": 1, "exams": 1},
        "segmental": {"found": 1, "exams": 2},
        "subsegmental": {"found": 0, "exams": 0},
    }
    with pytest.raises(InputError, match="no negative_exam_for_pe prediction for 1 positive study"):
        exam_sensitivity_by_level(truth, {"A": 0.2, "B": 0.4})
    with pytest.raises(InputError, match="no 'level' column"):
        exam_sensitivity_by_level(truth.drop(columns=["level"]), negative)
