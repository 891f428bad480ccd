"""Classification metrics against hand-computed and scikit-learn values; ordinal thresholds."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from cxr_noisy_student.loops.metrics import (
    apply_ordinal_thresholds, classification_metrics, optimize_ordinal_thresholds, quadratic_weighted_kappa, soft_log_loss,
)

NAMES = ["covid", "other", "normal"]


def test_multiclass_metrics_by_hand():
    y = np.eye(3)[[0, 0, 1, 2]]
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    m = classification_metrics(y, p, NAMES, "multiclass")
    # covid: positives score 0.7, 0.4; negatives 0.2, 0.1 -> every pair ordered -> AUC 1
    assert m["auc_per_class"]["covid"] == 1.0
    # other: positive 0.6 vs negatives 0.2, 0.5, 0.1 -> AUC 1; normal: 0.8 vs 0.1, 0.1, 0.2 -> 1
    assert m["auc_macro"] == 1.0
    assert m["accuracy"] == 0.75  # row 2 predicts "other"
    # F1: covid P=1 R=0.5 -> 2/3; other P=0.5 R=1 -> 2/3; normal 1 -> macro 7/9
    assert m["f1_macro"] == pytest.approx(7 / 9)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.4, 0.6, 0.8])))
    assert m["log_loss"] == pytest.approx(log_loss([0, 0, 1, 2], p))
    assert m["n"] == 4


def test_soft_targets_and_sklearn_agreement():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    p = rng.dirichlet([1, 1, 1], 40)
    soft = 0.7 * np.eye(3)[labels] + 0.3 * rng.dirichlet([1, 1, 1], 40)  # blended labels, argmax unchanged
    m = classification_metrics(soft, p, NAMES, "multiclass")
    for c, name in enumerate(NAMES):
        assert m["auc_per_class"][name] == pytest.approx(roc_auc_score(labels == c, p[:, c]))
    assert m["f1_macro"] == pytest.approx(f1_score(labels, p.argmax(1), average="macro"))
    assert m["log_loss"] == pytest.approx(-(soft * np.log(p)).sum(1).mean())


def test_class_with_one_label_value_has_no_auc():
    y = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], float)  # nobody is "normal"
    p = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(y, p, NAMES, "multiclass")
    assert m["auc_per_class"]["normal"] is None
    assert m["auc_macro"] == pytest.approx(np.mean([1.0, 1.0]))
    single = classification_metrics(np.eye(3)[[0, 0]], p[:2], NAMES, "multiclass")
    assert single["auc_macro"] is None and single["accuracy"] == 0.5


def test_multilabel_metrics():
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]], float)
    p = np.array([[0.9, 0.2, 0.6], [0.3, 0.7, 0.8], [0.6, 0.4, 0.9], [0.1, 0.1, 0.7]])
    m = classification_metrics(y, p, NAMES, "multilabel")
    assert m["auc_per_class"]["covid"] == 1.0 and m["auc_per_class"]["normal"] is None
    assert m["accuracy"] == 0.75  # subset accuracy: row 2 misses "other"
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert m["log_loss"] == pytest.approx(bce) and soft_log_loss(y, p, mode="multilabel") == pytest.approx(bce)


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="must both be"):
        classification_metrics(np.zeros((2, 3)), np.zeros((2, 2)), NAMES, "multiclass")
    with pytest.raises(ValueError, match="unlabeled rows"):
        classification_metrics(np.full((1, 3), np.nan), np.ones((1, 3)) / 3, NAMES, "multiclass")
    with pytest.raises(ValueError, match="mode"):
        classification_metrics(np.eye(3), np.eye(3), NAMES, "ordinal")


def test_quadratic_weighted_kappa_by_hand():
    # a constant prediction agrees no better than chance: kappa 0
    assert quadratic_weighted_kappa([0, 1], [0, 0]) == pytest.approx(0.0)
    assert quadratic_weighted_kappa([0, 1, 2], [0, 1, 2]) == 1.0
    assert quadratic_weighted_kappa([0, 1, 2], [2, 1, 0]) == pytest.approx(-1.0)
    assert np.isnan(quadratic_weighted_kappa([1, 1], [1, 1]))


def test_ordinal_thresholds_improve_kappa_and_stay_sorted():
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 4, 400)
    scores = grades + 0.45 + rng.normal(0, 0.3, 400)  # biased upwards: rounding at k + 0.5 over-grades
    start = quadratic_weighted_kappa(grades, apply_ordinal_thresholds(scores, [0.5, 1.5, 2.5]))
    t = optimize_ordinal_thresholds(grades, scores)
    assert len(t) == 3 and np.all(np.diff(t) > 0)
    assert quadratic_weighted_kappa(grades, apply_ordinal_thresholds(scores, t)) > start + 0.02
    assert np.allclose(t, [0.95, 1.95, 2.95], atol=0.25)  # the bias is found


def test_apply_ordinal_thresholds_counts_thresholds_reached():
    assert apply_ordinal_thresholds([0.2, 0.5, 1.49, 3.0], [0.5, 1.5]).tolist() == [0, 1, 1, 2]
    perfect = optimize_ordinal_thresholds([0, 1, 2, 1], [0.1, 1.0, 2.0, 0.9])
    assert perfect.tolist() == [0.5, 1.5]  # already optimal: unchanged
