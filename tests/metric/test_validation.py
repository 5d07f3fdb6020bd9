"""The validation report (``pedetect evaluate --report DIR``, pedetect.metric.validation): every figure
against an independent computation (scikit-learn, scipy, plain loops), the bootstrap's coverage on a
model of known AUC, subgroups from synthetic studies' own headers (and the synthetic headers
themselves: new equipment fields, nothing else changed), and the page in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score

if __name__ == "__main__":  # run as a script: tests/, where the helpers package is, is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.metric import make_submission, random_labels, write
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SERIES, SOP, STUDY, exam_id
from pedetect.metric.evaluate import evaluate_files
from pedetect.metric.submission import read_labels, read_submission
from pedetect.metric.validation import (
    BOOTSTRAP_RESAMPLES,
    EXAM_PE,
    bootstrap_auc,
    bootstrap_clustered_auc,
    calibration,
    percentile_interval,
    resample_counts,
    validation_report,
    wilson_interval,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ helpers


def wilson_by_formula(k: int, n: int, z: float = norm.ppf(0.975)) -> tuple[float, float]:
    """Wilson's score interval, written out here from its formula (Wilson 1927)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def noisy_submission(labels: pd.DataFrame, seed: int = 0, ties: bool = False) -> pd.DataFrame:
    """Predictions that follow the truth with noise (rounded to one decimal with ``ties``)."""
    rng = np.random.default_rng(seed)
    image = dict(zip(labels[SOP], labels[IMAGE_LABEL]))
    exams = labels.drop_duplicates(STUDY).set_index(STUDY)

    def squash(value: float) -> float:
        value = float(np.clip(value, 0, 1))
        return round(value, 1) if ties else value

    return make_submission(
        labels,
        lambda sop: squash(0.35 * image[sop] + 0.65 * rng.random()),
        lambda study, label: squash(0.4 * exams.loc[study, label] + 0.6 * rng.random()),
    )


def resampled_auc_by_sklearn(truth_of, score_of, draws: np.ndarray) -> list[float]:
    """The AUC of each resample with scikit-learn, on rows built by repeating what each drawn study holds."""
    out = []
    for row in draws:
        truth = np.concatenate([truth_of[j] for j in row])
        score = np.concatenate([score_of[j] for j in row])
        out.append(roc_auc_score(truth, score) if 0 < truth.sum() < len(truth) else np.nan)
    return out


# ----------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("k,n", [(0, 1), (0, 7), (3, 7), (7, 7), (1, 20), (50, 100), (99, 100), (412, 1000)])
def test_wilson_interval_matches_its_formula_and_scipy(k, n):
    low, high = wilson_interval(k, n)
    by_formula = wilson_by_formula(k, n)
    scipy_ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert low == pytest.approx(max(0.0, by_formula[0]), abs=1e-12)
    assert high == pytest.approx(min(1.0, by_formula[1]), abs=1e-12)
    assert (low, high) == pytest.approx((scipy_ci.low, scipy_ci.high), abs=1e-12)
    assert wilson_interval(0, 0) is None


def test_resample_counts_draw_every_resample_from_the_seeded_generator():
    counts = resample_counts(5, 7, np.random.default_rng(3))
    draws = np.random.default_rng(3).integers(0, 5, size=(7, 5))
    assert counts.shape == (7, 5) and (counts.sum(1) == 5).all()
    for row, drawn in zip(counts, draws):
        assert row.tolist() == np.bincount(drawn, minlength=5).tolist()


def test_bootstrap_auc_equals_sklearn_on_every_resample_with_ties():
    rng = np.random.default_rng(1)
    n = 40
    truth = rng.random(n) < 0.4
    score = np.round(rng.random(n) + 0.4 * truth, 1)  # many ties
    counts = resample_counts(n, 60, np.random.default_rng(5))
    draws = np.random.default_rng(5).integers(0, n, size=(60, n))
    ours = bootstrap_auc(truth, score, counts)
    expected = resampled_auc_by_sklearn([[t] for t in truth], [[s] for s in score], draws)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    # A resample without a positive has no AUC.
    only_negatives = np.zeros((1, n), dtype=np.int32)
    only_negatives[0, np.flatnonzero(~truth)[0]] = n
    assert np.isnan(bootstrap_auc(truth, score, only_negatives)[0])
    # Every study once: the AUC itself.
    assert bootstrap_auc(truth, score, np.ones((1, n), dtype=np.int32))[0] == pytest.approx(roc_auc_score(truth, score))


def test_slice_bootstrap_takes_all_slices_of_each_drawn_study():
    rng = np.random.default_rng(2)
    studies = 25
    sizes = rng.integers(1, 9, studies)
    cluster = np.repeat(np.arange(studies), sizes)
    truth = (rng.random(len(cluster)) < 0.3) & (rng.random(studies) < 0.6)[cluster]
    score = np.round(rng.random(len(cluster)) + 0.5 * truth, 2)
    counts = resample_counts(studies, 40, np.random.default_rng(8))
    draws = np.random.default_rng(8).integers(0, studies, size=(40, studies))
    ours = bootstrap_clustered_auc(truth, score, cluster, counts)
    expected = resampled_auc_by_sklearn(
        [truth[cluster == j] for j in range(studies)], [score[cluster == j] for j in range(studies)], draws
    )
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


def test_percentile_interval_ignores_undefined_resamples():
    values = np.r_[np.linspace(0.5, 0.9, 101), [np.nan] * 5]
    assert percentile_interval(values) == pytest.approx(np.percentile(np.linspace(0.5, 0.9, 101), [2.5, 97.5]).tolist())
    assert percentile_interval(np.array([np.nan, 0.7])) is None


def test_calibration_bins_and_ece_by_hand():
    truth = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    prob = np.array([0.05, 0.12, 0.15, 0.55, 0.58, 0.91, 0.99, 1.0])
    result = calibration(truth, prob)
    # Bins [0, .1): {0.05}; [.1, .2): {.12, .15}; [.5, .6): {.55, .58}; [.9, 1]: {.91, .99, 1.0}.
    expected_ece = (
        1 / 8 * abs(0 - 0.05) + 2 / 8 * abs(0.5 - 0.135) + 2 / 8 * abs(1 - 0.565) + 3 / 8 * abs(2 / 3 - 2.9 / 3)
    )
    assert result["ece"] == pytest.approx(expected_ece, abs=1e-12)
    counts = [b["count"] for b in result["bins"]]
    assert counts == [1, 2, 0, 0, 0, 2, 0, 0, 0, 3] and len(result["bins"]) == 10
    assert result["bins"][9]["observed"] == pytest.approx(2 / 3) and result["bins"][2]["mean_predicted"] is None


def test_bootstrap_interval_covers_a_known_auc_in_95_percent_of_draws():
    """200 draws of 100 studies from a binormal model (negatives N(0, 1), positives N(1.2, 1), 40%
    positive: true AUC Φ(1.2/√2) = 0.802), each with the report's 2,000 resamples: the 95% interval
    covers the true AUC in at least 93% of draws (4,000 draws measured 94.4%: docs/evaluation.md)."""
    d, n, draws = 1.2, 100, 200
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for _ in range(draws):
        truth = rng.random(n) < 0.4
        score = rng.normal(size=n) + d * truth
        low, high = percentile_interval(bootstrap_auc(truth, score, resample_counts(n, BOOTSTRAP_RESAMPLES, rng)))
        covered += low <= true_auc <= high
        widths.append(high - low)
    assert 0.93 <= covered / draws <= 0.99, covered / draws
    # Hanley & McNeil's standard error of this AUC: the intervals are about ±1.96 of it wide.
    q1, q2 = true_auc / (2 - true_auc), 2 * true_auc**2 / (1 + true_auc)
    n1, n0 = 0.4 * n, 0.6 * n
    se = np.sqrt(
        (true_auc * (1 - true_auc) + (n1 - 1) * (q1 - true_auc**2) + (n0 - 1) * (q2 - true_auc**2)) / (n1 * n0)
    )
    assert np.mean(widths) == pytest.approx(2 * 1.96 * se, rel=0.15)


# ----------------------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """60 random studies (helpers.metric.random_labels) with noisy, tied predictions, on disk."""
    folder = tmp_path_factory.mktemp("validation")
    labels = random_labels(np.random.default_rng(4), 60)
    submission = noisy_submission(labels, seed=1, ties=True)
    return {
        "labels": write(labels, folder / "labels.csv"),
        "submission": write(submission, folder / "sub.csv"),
        "folder": folder,
    }


RESAMPLES, SEED = 150, 11


@pytest.fixture(scope="module")
def report(case):
    labels, submission = read_labels(case["labels"]), read_submission(case["submission"])
    return validation_report(labels, submission, resamples=RESAMPLES, seed=SEED).report


def independent_tables(case):
    """Per study and per slice, computed here with pandas from the two files."""
    labels = pd.read_csv(case["labels"], dtype={STUDY: str, SOP: str})
    values = pd.read_csv(case["submission"]).set_index("id")["label"]
    slices = labels[[STUDY, SOP, IMAGE_LABEL]].copy()
    slices["p"] = values.loc[slices[SOP]].to_numpy()
    studies = list(dict.fromkeys(labels[STUDY]))
    exams = labels.drop_duplicates(STUDY).set_index(STUDY).loc[studies]
    exam_p = pd.DataFrame({label: [values[exam_id(s, label)] for s in studies] for label in EXAM_LABELS}, index=studies)
    per_study = slices.groupby(STUDY, sort=False).agg(pe=(IMAGE_LABEL, "max"), score=("p", "max")).loc[studies]
    return studies, slices, exams, exam_p, per_study


def test_aucs_and_their_intervals_equal_sklearn_on_the_seeded_resamples(case, report):
    studies, slices, exams, exam_p, per_study = independent_tables(case)
    draws = np.random.default_rng(SEED).integers(0, len(studies), size=(RESAMPLES, len(studies)))
    for label in EXAM_LABELS:
        entry = report["labels"][label]
        truth, score = exams[label].to_numpy(), exam_p[label].to_numpy()
        if 0 < truth.sum() < len(truth):
            assert entry["auc"] == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
            resampled = resampled_auc_by_sklearn([[t] for t in truth], [[s] for s in score], draws)
            assert entry["auc_ci95"] == pytest.approx(np.nanpercentile(resampled, [2.5, 97.5]).tolist(), abs=1e-12)
        else:
            assert entry["auc"] is None and entry["auc_ci95"] is None
    # Slices: whole studies resampled.
    by_study = dict(list(slices.groupby(STUDY, sort=False)))
    resampled = resampled_auc_by_sklearn(
        [by_study[s][IMAGE_LABEL].to_numpy() for s in studies], [by_study[s]["p"].to_numpy() for s in studies], draws
    )
    image = report["labels"][IMAGE_LABEL]
    assert image["auc"] == pytest.approx(roc_auc_score(slices[IMAGE_LABEL], slices["p"]), abs=1e-12)
    assert image["auc_ci95"] == pytest.approx(np.nanpercentile(resampled, [2.5, 97.5]).tolist(), abs=1e-12)
    # The exam-level decision: the study's highest slice.
    pe = report[EXAM_PE]
    assert pe["auc"] == pytest.approx(roc_auc_score(per_study["pe"], per_study["score"]), abs=1e-12)
    resampled = resampled_auc_by_sklearn([[t] for t in per_study["pe"]], [[s] for s in per_study["score"]], draws)
    assert pe["auc_ci95"] == pytest.approx(np.nanpercentile(resampled, [2.5, 97.5]).tolist(), abs=1e-12)
    assert pe["negative_exam_for_pe_auc"] == report["labels"]["negative_exam_for_pe"]["auc"]
    assert pe["positives"] == int(per_study["pe"].sum()) and pe["n"] == len(studies)


def test_proportions_at_the_thresholds_equal_counts_and_scipy_wilson(case, report):
    _, slices, exams, exam_p, per_study = independent_tables(case)

    def check(entry, truth, score, threshold=0.5):
        called = score > threshold
        tp, fp = int((called & truth).sum()), int((called & ~truth).sum())
        tn, fn = int((~called & ~truth).sum()), int((~called & truth).sum())
        assert (entry["tp"], entry["fp"], entry["tn"], entry["fn"]) == (tp, fp, tn, fn)
        for name, k, n in (
            ("sensitivity", tp, tp + fn),
            ("specificity", tn, tn + fp),
            ("ppv", tp, tp + fp),
            ("npv", tn, tn + fn),
        ):
            if n == 0:
                assert entry[name] is None and entry[f"{name}_ci95"] is None
                continue
            ci = binomtest(k, n).proportion_ci(method="wilson")
            assert entry[name] == pytest.approx(k / n)
            assert entry[f"{name}_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-12)

    for label in EXAM_LABELS:
        check(report["labels"][label]["at_threshold"], exams[label].to_numpy() == 1, exam_p[label].to_numpy())
    check(report["labels"][IMAGE_LABEL]["at_threshold"], slices[IMAGE_LABEL].to_numpy() == 1, slices["p"].to_numpy())
    [point] = report[EXAM_PE]["operating_points"]
    assert point["name"] == "challenge_0.5" and point["threshold"] == 0.5
    check(point, per_study["pe"].to_numpy() == 1, per_study["score"].to_numpy())


def test_calibration_equals_pandas_bins(case, report):
    _, slices, exams, exam_p, _ = independent_tables(case)
    for label, truth, prob in [(IMAGE_LABEL, slices[IMAGE_LABEL], slices["p"])] + [
        (label, exams[label], exam_p[label]) for label in EXAM_LABELS
    ]:
        frame = pd.DataFrame({"y": np.asarray(truth, float), "p": np.asarray(prob, float)})
        frame["bin"] = np.minimum(np.floor(frame["p"] * 10), 9).astype(int)
        groups = frame.groupby("bin").agg(n=("y", "size"), y=("y", "mean"), p=("p", "mean"))
        ece = float((groups["n"] / len(frame) * (groups["y"] - groups["p"]).abs()).sum())
        cal = report["labels"][label]["calibration"]
        assert cal["ece"] == pytest.approx(ece, abs=1e-12)
        for k, row in groups.iterrows():
            b = cal["bins"][k]
            assert b["count"] == row["n"] and b["observed"] == pytest.approx(row["y"])
            assert b["mean_predicted"] == pytest.approx(row["p"])


def test_the_metric_is_evaluates_own(case, report):
    plain = evaluate_files(case["labels"], case["submission"])
    for key in ("score", "image_part", "exam_part", "slice_auc", "n_studies", "n_slices"):
        assert report[key] == plain[key]
    for label, entry in plain["labels"].items():
        assert {k: report["labels"][label][k] for k in entry} == entry
    boot = report["methods"]["bootstrap"]
    assert boot["resamples"] == RESAMPLES and boot["seed"] == SEED


def test_command_writes_the_report_folder(cli, case):
    out = case["folder"] / "report"
    result = cli(
        "evaluate",
        *("--labels", case["labels"], "--submission", case["submission"]),
        *("--report", out, "--bootstrap", RESAMPLES, "--seed", SEED, "--json"),
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    on_disk = json.loads((out / "report.json").read_text())
    assert printed["labels"] == on_disk["labels"] and printed["exam_pe"]["auc_ci95"] == on_disk["exam_pe"]["auc_ci95"]
    for name in EXAM_LABELS + (IMAGE_LABEL,):
        assert {"auc", "auc_ci95", "log_loss", "calibration", "at_threshold"} <= set(on_disk["labels"][name])
    for figure in on_disk["figures"].values():
        assert (out / figure).read_bytes()[:8] == PNG_SIGNATURE
    page = (out / "index.html").read_text()
    assert "<script" not in page.lower() and not re.search(r"(src|href)=\"(https?:)?//", page)
    for source in re.findall(r'src="([^"]+)"', page):
        assert (out / source).is_file()
    # The tables stay: the usual text output plus the report's.
    text = cli(
        "evaluate", "--labels", case["labels"], "--submission", case["submission"], "--report", out, "--bootstrap", 50
    )
    assert text.exit_code == 0 and "score (weighted log loss)" in text.stdout and "exam PE (max slice)" in text.stdout


def test_command_errors(cli, case):
    result = cli("evaluate", "--labels", case["labels"], "--submission", case["submission"], "--dicom", case["folder"])
    assert result.exit_code == 2 and "--report" in result.output
    result = cli("evaluate", "--labels", case["labels"], "--report", case["folder"] / "r")
    assert result.exit_code == 2
    result = cli(
        "evaluate",
        *("--labels", case["labels"], "--submission", case["submission"], "--report", case["folder"] / "r"),
        *("--operating-points", case["folder"] / "nothing.json"),
    )
    assert result.exit_code == 2 and "operating points file not found" in result.output


def test_froc_inside_the_same_report(cli, tmp_path):
    from helpers.metric import make_labels, six_candidates_over_three_scans

    truth, candidates = six_candidates_over_three_scans()
    labels = make_labels({"A": [1, 0], "B": [1, 0], "C": [0, 0]}, {"C": {"negative_exam_for_pe": 1}})
    submission = make_submission(labels, lambda sop: 0.6 if sop.endswith(".0") else 0.2, lambda study, label: 0.5)
    out = tmp_path / "report"
    result = cli(
        "evaluate",
        *("--labels", write(labels, tmp_path / "l.csv"), "--submission", write(submission, tmp_path / "s.csv")),
        *("--clots", write(truth, tmp_path / "c.csv"), "--candidates", write(candidates, tmp_path / "k.csv")),
        *("--report", out, "--bootstrap", 20),
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["froc"]["rules"]["neighbour_box3"]["sensitivity"]["1"] == 0.75
    assert report["figures"]["froc"] == "froc.png" and (out / "froc.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "FROC (per embolus)" in (out / "index.html").read_text()


# ------------------------------------------------------------------------------- synthetic headers


def test_synthetic_files_hold_the_plan_with_equipment_headers(tmp_path):
    from pedetect.synth import plan_study, render_study, write_dataset

    labels = write_dataset(tmp_path, 3, slices=16, size=64, seed=5, progress=False, positive_fraction=0.5)
    # What the files hold is what plan_study and render_study give.
    expected = []
    for index in range(3):
        plan = plan_study(index, seed=5, size=64, slices=16, positive_fraction=0.5)
        study = render_study(index, seed=5, size=64, slices=16, positive_fraction=0.5)
        expected.append(plan.labels_frame())
        folder = tmp_path / "train" / plan.study_uid / plan.series_uid
        for k, sop in enumerate(plan.sop_uids):
            ds = pydicom.dcmread(folder / f"{sop}.dcm")
            np.testing.assert_array_equal(ds.pixel_array, study.stored[k])
            assert int(ds.InstanceNumber) == plan.instance_numbers[k]
            assert ds.Manufacturer == plan.scanner.manufacturer and ds.ManufacturerModelName == plan.scanner.model
            assert float(ds.SliceThickness) == pytest.approx(plan.scanner.thickness)
            assert ds.ConvolutionKernel == plan.scanner.kernel
    pd.testing.assert_frame_equal(pd.concat(expected, ignore_index=True), labels.reset_index(drop=True))
    csv = pd.read_csv(tmp_path / "train.csv", dtype={STUDY: str, SERIES: str, SOP: str})
    pd.testing.assert_frame_equal(csv, labels.reset_index(drop=True), check_dtype=False)


def test_synthetic_equipment_varies_from_its_own_stream():
    from pedetect.synth import plan_study
    from pedetect.synth.phantom import sample_equipment
    from pedetect.synth.scanner import EQUIPMENT as TABLE

    plans = [plan_study(i, seed=8, size=64, slices=4) for i in range(80)]
    vendors = {p.scanner.manufacturer for p in plans}
    models = {(p.scanner.manufacturer, p.scanner.model) for p in plans}
    assert vendors == {vendor for vendor, _ in TABLE} and len(models) == 8
    assert all(vendor.startswith("Synthetic") for vendor in vendors)
    assert len({p.scanner.kernel for p in plans}) == 4 and len({p.scanner.thickness for p in plans}) >= 5
    # The equipment is a function of (seed, split, index) alone, drawn from default_rng([seed, split, index, 7]).
    rng = np.random.default_rng([8, 0, 3, 7])
    vendor, names = TABLE[int(rng.integers(len(TABLE)))]
    assert sample_equipment(8, "train", 3) == (vendor, names[int(rng.integers(len(names)))])
    assert (plans[3].scanner.manufacturer, plans[3].scanner.model) == sample_equipment(8, "train", 3)


# ------------------------------------------------------------------------------------------ subgroups


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """8 synthetic studies (16 slices of 64 px) and noisy predictions; one study's files carry a
    contrast agent, and one study is left out of the DICOM folder."""
    from pedetect.synth import write_dataset

    root = tmp_path_factory.mktemp("subgroups")
    labels = write_dataset(root / "data", 8, slices=16, size=64, seed=12, progress=False, positive_fraction=0.5)
    studies = list(dict.fromkeys(labels[STUDY]))
    dicom = root / "dicom"
    shutil.copytree(root / "data" / "train", dicom)
    shutil.rmtree(dicom / studies[-1])
    for path in (dicom / studies[0]).rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.ContrastBolusAgent = "IOHEXOL"
        ds.save_as(path)
    submission = noisy_submission(labels, seed=3)
    return {
        "labels": root / "data" / "train.csv",
        "submission": write(submission, root / "sub.csv"),
        "dicom": dicom,
        "studies": studies,
        "root": root,
    }


def test_subgroups_from_the_studies_own_headers(cli, synthetic):
    out = synthetic["root"] / "report"
    result = cli(
        "evaluate",
        *("--labels", synthetic["labels"], "--submission", synthetic["submission"]),
        *("--report", out, "--dicom", synthetic["dicom"], "--bootstrap", 100),
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    sub = report["subgroups"]
    studies = synthetic["studies"]
    assert sub["studies_found"] == 7 and sub["studies_without_dicom"] == 1 and sub["unreadable_files"] == 0

    # Each study's values, read here straight from one of its files.
    labels = pd.read_csv(synthetic["labels"], dtype=str)
    truth = labels.groupby(STUDY)[IMAGE_LABEL].apply(lambda s: (s == "1").any())
    values = pd.read_csv(synthetic["submission"]).set_index("id")["label"]
    score = labels.assign(p=values.loc[labels[SOP]].to_numpy()).groupby(STUDY)["p"].max()
    expected: dict[str, dict[str, str]] = {name: {} for name in sub["fields"]}
    for study in studies[:-1]:
        ds = pydicom.dcmread(next((synthetic["dicom"] / study).rglob("*.dcm")))
        thickness = float(ds.SliceThickness)
        expected["manufacturer"][study] = ds.Manufacturer
        expected["model"][study] = f"{ds.Manufacturer} / {ds.ManufacturerModelName}"
        expected["kernel"][study] = ds.ConvolutionKernel
        expected["slice_thickness"][study] = (
            "<=1 mm"
            if thickness <= 1
            else "(1, 2] mm"
            if thickness <= 2
            else "(2, 3] mm"
            if thickness <= 3
            else ">3 mm"
        )
        expected["contrast"][study] = "agent recorded, no start time" if study == studies[0] else "not recorded"
        expected["slices"][study] = "<100"
    for values in expected.values():
        values[studies[-1]] = "unknown (no DICOM found)"
    assert len(set(expected["manufacturer"].values())) >= 3  # the synthetic headers vary

    for name, table in sub["fields"].items():
        groups = {g["value"]: g for g in table["groups"]}
        wanted = pd.Series(expected[name])
        assert set(groups) == set(wanted)
        assert sum(g["studies"] for g in groups.values()) == 8
        for value, group in groups.items():
            members = wanted.index[wanted == value]
            t, s = truth.loc[members].to_numpy(), score.loc[members].to_numpy()
            assert (group["studies"], group["positives"]) == (len(members), int(t.sum()))
            assert group["small"] is True and "fewer than 10 studies" in group["small_reason"]
            if 0 < t.sum() < len(t):
                assert group["auc"] == pytest.approx(roc_auc_score(t, s), abs=1e-12)
                assert group["auc_ci95"] is not None
            else:
                assert group["auc"] is None
            at = group["operating_points"]["challenge_0.5"]
            tp = int(((s > 0.5) & t).sum())
            if t.sum():
                ci = binomtest(tp, int(t.sum())).proportion_ci(method="wilson")
                assert at["sensitivity"] == pytest.approx(tp / t.sum())
                assert at["sensitivity_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-12)
    assert (out / "subgroups.png").read_bytes()[:8] == PNG_SIGNATURE
    page = (out / "index.html").read_text()
    assert "Synthetic Vendor" in page and 'class="small"' in page


# ------------------------------------------------------------------------------------------- browser


def test_the_page_opens_from_file_without_console_errors(cli, case, tmp_path):
    from helpers.browser import browser_paths, missing, start_browser

    try:
        import selenium  # noqa: F401
    except ImportError:
        missing(
            "selenium is missing (it is in the test extra: pip install -e '.[test]'): the report's browser test cannot run"
        )
    if browser_paths() is None:
        missing(
            "headless Chromium is missing (apt-get install -y chromium chromium-driver): the report's browser test cannot run"
        )
    from selenium.webdriver.common.by import By

    out = tmp_path / "report"
    result = cli(
        "evaluate", "--labels", case["labels"], "--submission", case["submission"], "--report", out, "--bootstrap", 50
    )
    assert result.exit_code == 0, result.output
    driver = start_browser()
    try:
        driver.get((out / "index.html").as_uri())
        assert driver.title == "pedetect validation report"
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 2
        for image in images:  # every figure loaded from beside the page
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 500
        tables = driver.find_elements(By.TAG_NAME, "table")
        assert len(tables) >= 3
        assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []
    finally:
        driver.quit()


# ------------------------------------------------------------------------------ the docs' example


def simulated_submission(labels: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Predictions of a simulated model (not a trained one): logits that follow the truth with noise."""
    rng = np.random.default_rng(seed)
    squash = lambda logit: float(1 / (1 + np.exp(-logit)))  # noqa: E731
    image = dict(zip(labels[SOP], labels[IMAGE_LABEL]))
    exams = labels.drop_duplicates(STUDY).set_index(STUDY)
    return make_submission(
        labels,
        lambda sop: squash(-3.5 + 4.5 * image[sop] + rng.normal(0, 1.3)),
        lambda study, label: squash(-1.5 + 3.0 * exams.loc[study, label] + rng.normal(0, 1.2)),
    )


def save_example(out: Path, studies: int = 200) -> None:
    """docs/evaluation_example.png: the report of ``studies`` synthetic test studies (24 slices of
    64 px) with a simulated model's predictions, its operating points calibrated on other synthetic
    studies, subgroups from the test studies' headers; the page's top, screenshot by headless Chromium."""
    import subprocess
    import tempfile

    from typer.testing import CliRunner

    from helpers.browser import browser_paths
    from pedetect.cli import app
    from pedetect.synth import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kw = dict(slices=24, size=64, progress=False, workers=2)
        tune = write_dataset(root / "tune", studies, seed=41, **kw)
        test = write_dataset(root / "test", studies, seed=42, split="test", **kw)
        write(simulated_submission(tune, 1), root / "tune_sub.csv")
        write(simulated_submission(test, 2), root / "test_sub.csv")
        (root / "model").mkdir()
        runner = CliRunner()
        for args in (
            ["calibrate", "--labels", root / "tune" / "train.csv", "--submission", root / "tune_sub.csv"]
            + ["--model", root / "model"],
            ["evaluate", "--labels", root / "test" / "test_labels.csv", "--submission", root / "test_sub.csv"]
            + ["--report", root / "report", "--dicom", root / "test" / "test", "--operating-points", root / "model"],
        ):
            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, result.output
            print(result.stdout)
        browser, _ = browser_paths()
        shot = root / "page.png"
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
            + ["--window-size=1300,1500", f"--screenshot={shot}", (root / "report" / "index.html").as_uri()],
            check=True,
            capture_output=True,
            timeout=120,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot a validation report (docs/evaluation_example.png).")
    parser.add_argument("out", type=Path, help="PNG to write, e.g. docs/evaluation_example.png")
    parser.add_argument("--studies", type=int, default=200)
    arguments = parser.parse_args()
    save_example(arguments.out, arguments.studies)
