"""The competition metric: hand-computed cases, invariances, numpy/torch agreement, input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers.metric import make_labels, make_submission, random_labels, write
from pedetect.labels import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_LABEL, SOP, STUDY
from pedetect.metric.evaluate import evaluate_frames
from pedetect.metric.loss import weighted_log_loss, weighted_log_loss_parts
from pedetect.metric.submission import InputError, read_labels, read_submission


@pytest.fixture
def evaluate_cli(cli, tmp_path):
    """``pedetect evaluate`` of a labels frame and a submission frame (written as labels.csv, sub.csv)."""

    def invoke(labels: pd.DataFrame, submission: pd.DataFrame, *options: str):
        labels_path, submission_path = write(labels, tmp_path / "labels.csv"), write(submission, tmp_path / "sub.csv")
        return cli("evaluate", "--labels", labels_path, "--submission", submission_path, *options)

    return invoke


@pytest.fixture
def evaluate_json(evaluate_cli):
    """``pedetect evaluate --json``'s report, which must exit 0."""

    def report(labels: pd.DataFrame, submission: pd.DataFrame) -> dict:
        result = evaluate_cli(labels, submission, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    return report


def paper_example():
    """Two exams. A: slices truth [1, 0] predicted [0.8, 0.4]; central, right, rv_lv<1 true;
    every exam prediction 0.5 but central_pe 0.9. B: three negative slices predicted 0.1, 0.3, 0.2;
    negative_exam_for_pe true, predicted 0.75, the other exam predictions 0.5."""
    labels = make_labels(
        {"A": [1, 0], "B": [0, 0, 0]},
        {"A": {"central_pe": 1, "rightsided_pe": 1, "rv_lv_ratio_lt_1": 1}, "B": {"negative_exam_for_pe": 1}},
    )
    image = {"A.0": 0.8, "A.1": 0.4, "B.0": 0.1, "B.1": 0.3, "B.2": 0.2}
    exam = {("A", "central_pe"): 0.9, ("B", "negative_exam_for_pe"): 0.75}
    submission = make_submission(labels, image.get, lambda s, label: exam.get((s, label), 0.5))
    return labels, submission


def test_two_exam_example_worked_on_paper(evaluate_json):
    labels, submission = paper_example()
    # On paper. q_A = 1/2, so A's slices weigh 0.07361963 / 2 each; q_B = 0, B's slices weigh 0.
    image_loss = 0.07361963 / 2 * (-math.log(0.8) - math.log(1 - 0.4))
    image_weight = 0.07361963  # 2 slices x 0.07361963 / 2
    # Exam labels predicted 0.5 cost ln 2 whatever the truth; the nine weights sum to 0.99999999992.
    total_w = 0.99999999992
    exam_loss = (
        (2 * total_w - 0.1877300613 - 0.0736196319) * math.log(2)
        + 0.1877300613 * -math.log(0.9)  # A central_pe: truth 1, predicted 0.9
        + 0.0736196319 * -math.log(0.75)  # B negative_exam_for_pe: truth 1, predicted 0.75
    )
    expected = (image_loss + exam_loss) / (image_weight + 2 * total_w)
    assert expected == pytest.approx(0.61395841050, abs=1e-10)

    report = evaluate_json(labels, submission)
    assert report["score"] == pytest.approx(expected, abs=1e-12)
    assert report["image_part"] == pytest.approx(image_loss / image_weight, abs=1e-12)
    assert report["exam_part"] == pytest.approx(exam_loss / (2 * total_w), abs=1e-12)
    # Per-label log loss is the plain mean over exams; central_pe: (-ln 0.9 + ln 2) / 2.
    assert report["labels"]["central_pe"]["log_loss"] == pytest.approx((-math.log(0.9) + math.log(2)) / 2)
    # Slice AUC: the positive slice (0.8) outranks all four negatives.
    assert report["slice_auc"] == pytest.approx(1.0)
    assert report["labels"]["central_pe"]["auc"] == pytest.approx(1.0)
    assert report["n_studies"] == 2 and report["n_slices"] == 5


def test_all_half_scores_ln2(evaluate_json):
    labels = random_labels(np.random.default_rng(1), 30)
    submission = make_submission(labels, lambda sop: 0.5, lambda s, label: 0.5)
    report = evaluate_json(labels, submission)
    assert report["score"] == pytest.approx(math.log(2), abs=1e-12)


def test_perfect_predictions_score_zero(evaluate_json):
    labels = random_labels(np.random.default_rng(2), 30)
    image = labels.set_index(SOP)[IMAGE_LABEL].astype(float).to_dict()
    exams = labels.drop_duplicates(STUDY).set_index(STUDY)
    submission = make_submission(labels, image.get, lambda s, label: float(exams.loc[s, label]))
    report = evaluate_json(labels, submission)
    assert 0 <= report["score"] < 1e-12
    assert report["slice_auc"] == 1.0


def test_row_order_does_not_matter(tmp_path):
    rng = np.random.default_rng(3)
    labels = random_labels(rng, 25)
    submission = make_submission(labels, lambda sop: rng.random(), lambda s, label: rng.random())
    reference = evaluate_frames(labels_as_read(tmp_path, labels), submission_as_read(tmp_path, submission))
    shuffled_labels = labels.sample(frac=1, random_state=4)
    shuffled_submission = submission.sample(frac=1, random_state=5)
    report = evaluate_frames(
        labels_as_read(tmp_path, shuffled_labels), submission_as_read(tmp_path, shuffled_submission)
    )
    assert report["score"] == pytest.approx(reference["score"], rel=1e-13)
    for label in (IMAGE_LABEL,) + EXAM_LABELS:
        for key in ("log_loss", "auc"):
            a, b = report["labels"][label][key], reference["labels"][label][key]
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-12)


def labels_as_read(tmp_path, labels):
    return read_labels(write(labels, tmp_path / "l.csv"))


def submission_as_read(tmp_path, submission):
    return read_submission(write(submission, tmp_path / "s.csv"))


def test_slice_auc_and_label_auc_match_sklearn(evaluate_json):
    rng = np.random.default_rng(6)
    labels = random_labels(rng, 40)
    submission = make_submission(labels, lambda sop: rng.random(), lambda s, label: rng.random())
    report = evaluate_json(labels, submission)
    values = submission.set_index("id")["label"]
    assert report["slice_auc"] == pytest.approx(roc_auc_score(labels[IMAGE_LABEL], values.loc[labels[SOP]]))
    exams = labels.drop_duplicates(STUDY)
    ids = exams[STUDY] + "_central_pe"
    assert report["labels"]["central_pe"]["auc"] == pytest.approx(roc_auc_score(exams["central_pe"], values.loc[ids]))
    # chronic_pe is never positive in this truth: AUC is undefined, reported as null.
    assert report["labels"]["chronic_pe"]["auc"] is None


def random_arrays(seed: int, n_exams: int = 7):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, n_exams)
    exam_index = np.repeat(np.arange(n_exams), sizes)
    image_target = (rng.random(len(exam_index)) < 0.3).astype(np.float64)
    exam_target = (rng.random((n_exams, len(EXAM_LABELS))) < 0.4).astype(np.float64)
    image_pred = rng.uniform(0.001, 0.999, len(exam_index))
    exam_pred = rng.uniform(0.001, 0.999, exam_target.shape)
    return image_target, image_pred, exam_index, exam_target, exam_pred


@pytest.mark.parametrize("seed", range(5))
def test_numpy_and_torch_agree(seed):
    it, ip, idx, et, ep = random_arrays(seed)
    reference = weighted_log_loss(it, ip, idx, et, ep)
    as_torch = [torch.tensor(a) for a in (it, ip, idx, et, ep)]
    assert float(weighted_log_loss(*as_torch)) == pytest.approx(reference, abs=1e-12)

    # The training loss: float32 logits, differentiable.
    logit = lambda p: torch.tensor(np.log(p / (1 - p)), dtype=torch.float32, requires_grad=True)  # noqa: E731
    image_logits, exam_logits = logit(ip), logit(ep)
    loss = weighted_log_loss(
        torch.tensor(it, dtype=torch.float32),
        image_logits,
        torch.tensor(idx),
        torch.tensor(et, dtype=torch.float32),
        exam_logits,
        from_logits=True,
    )
    assert abs(loss.item() - reference) < 1e-6
    loss.backward()
    # d loss / d logit = w (sigmoid(x) - y) / Σw: check one exam label against the closed form.
    parts = weighted_log_loss_parts(it, ip, idx, et, ep)
    denominator = parts.image_weight + parts.exam_weight
    expected_grad = EXAM_WEIGHTS[EXAM_LABELS[0]] * (ep[0, 0] - et[0, 0]) / denominator
    assert float(exam_logits.grad[0, 0]) == pytest.approx(expected_grad, abs=1e-7)


def test_negative_slices_carry_no_weight():
    # Slices of a negative exam weigh 0: changing their predictions does not move the score.
    it, ip, idx, et, ep = random_arrays(9)
    it[idx == 0] = 0
    base = weighted_log_loss(it, ip, idx, et, ep)
    ip2 = ip.copy()
    ip2[idx == 0] = 0.999
    assert weighted_log_loss(it, ip2, idx, et, ep) == pytest.approx(base, abs=1e-15)


class TestBadInput:
    @pytest.fixture
    def rejected(self, evaluate_cli):
        """``pedetect evaluate``'s error message, which must exit 2."""

        def run(labels: pd.DataFrame, submission: pd.DataFrame) -> str:
            result = evaluate_cli(labels, submission)
            assert result.exit_code == 2, result.output
            return result.stderr

        return run

    def test_missing_ids(self, rejected):
        labels, submission = paper_example()
        message = rejected(labels, submission[~submission["id"].isin(["A.1", "B_central_pe"])])
        assert "sub.csv" in message and "2 expected id(s) are missing" in message
        assert "'A.1'" in message and "'B_central_pe'" in message

    def test_many_missing_ids_are_summarised(self, rejected):
        labels, submission = paper_example()
        message = rejected(labels, submission[~submission["id"].str.startswith("B")])
        assert "12 expected id(s) are missing" in message and "and 7 more" in message

    def test_unknown_ids(self, rejected):
        labels, submission = paper_example()
        extra = pd.DataFrame({"id": ["Z.9"], "label": [0.5]})
        message = rejected(labels, pd.concat([submission, extra]))
        assert "1 id(s) belong to no study" in message and "'Z.9'" in message

    def test_duplicate_ids(self, rejected):
        labels, submission = paper_example()
        message = rejected(labels, pd.concat([submission, submission.iloc[[3]]]))
        assert "appear more than once" in message and "'A_leftsided_pe'" in message

    @pytest.mark.parametrize("bad", ["nan", "1.5", "-0.1", "abc", ""])
    def test_values_not_probabilities(self, rejected, bad):
        labels, submission = paper_example()
        submission = submission.astype({"label": object})
        submission.loc[submission["id"] == "A.0", "label"] = bad
        message = rejected(labels, submission)
        assert "column 'label'" in message and "A.0=" in message

    def test_missing_columns(self, rejected):
        labels, submission = paper_example()
        message = rejected(labels.drop(columns=["central_pe"]), submission)
        assert "labels.csv lacks column(s) central_pe" in message
        message = rejected(labels, submission.rename(columns={"label": "prob"}))
        assert "sub.csv lacks column(s) label" in message

    def test_labels_not_binary(self, rejected):
        labels, submission = paper_example()
        labels = labels.astype({IMAGE_LABEL: float})
        labels.loc[0, IMAGE_LABEL] = 0.5
        assert "must hold 0 or 1" in rejected(labels, submission)

    def test_missing_file(self, tmp_path):
        with pytest.raises(InputError, match="not found"):
            read_submission(tmp_path / "nope.csv")


def test_prior_baseline_scores_the_label_entropy(evaluate_json):
    from pedetect.metric.baselines import label_prior, prior_submission

    labels = random_labels(np.random.default_rng(11), 40)
    prior = label_prior(labels)
    exams = labels.drop_duplicates(STUDY)
    assert prior["central_pe"] == pytest.approx(exams["central_pe"].mean())
    assert prior[IMAGE_LABEL] == pytest.approx(labels[IMAGE_LABEL].mean())
    report = evaluate_json(labels, prior_submission(prior, labels))
    # Predicting each exam label's own frequency f costs its binary entropy H(f) per exam.
    entropy = lambda f: 0.0 if f in (0, 1) else -(f * math.log(f) + (1 - f) * math.log(1 - f))  # noqa: E731
    assert report["labels"]["central_pe"]["log_loss"] == pytest.approx(entropy(prior["central_pe"]))
    assert report["score"] < math.log(2)


def test_exam_from_slices_follows_the_highest_slice():
    from pedetect.metric.baselines import exam_from_slices, label_prior, positive_exam_prior

    labels = make_labels(
        {"p": [0, 1, 1], "q": [1, 0], "n": [0, 0], "i": [0]},
        {
            "p": {"central_pe": 1, "rv_lv_ratio_gte_1": 1},
            "q": {"rightsided_pe": 1, "rv_lv_ratio_lt_1": 1},
            "n": {"negative_exam_for_pe": 1},
            "i": {"indeterminate": 1},
        },
    )
    positive_prior = positive_exam_prior(labels)
    assert positive_prior["central_pe"] == 0.5 and positive_prior["negative_exam_for_pe"] == 0.0
    exam = exam_from_slices(np.array([0.1, 0.8, 0.3]), label_prior(labels), positive_prior)
    assert exam["central_pe"] == pytest.approx(0.4) and exam["rv_lv_ratio_lt_1"] == pytest.approx(0.4)
    # 1 - 0.8 shared 1:1 between negative and indeterminate (one exam each in the truth).
    assert exam["negative_exam_for_pe"] == pytest.approx(0.1) and exam["indeterminate"] == pytest.approx(0.1)
