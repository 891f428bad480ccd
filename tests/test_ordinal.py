"""Ordinal-grade maths by hand: cumulative targets, expected grades, QWK, OOF thresholds, margins,
per-grade selection and balancing, sampling weights; and the weighted sampler of the training loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_noisy_student.datasets.errors import ConfigError
from cxr_noisy_student.loops.metrics import quadratic_weighted_kappa
from cxr_noisy_student.teacher_student import ordinal, pseudo
from cxr_noisy_student.teacher_student.config import load_config
from cxr_noisy_student.teacher_student.tasks.grader import validation_qwk

T5 = [0.5, 1.5, 2.5, 3.5]


def test_cumulative_targets_one_step_per_grade_boundary():
    assert ordinal.cumulative_targets([3], num_grades=5).tolist() == [[1, 1, 1, 0]]
    assert ordinal.cumulative_targets([0, 4], num_grades=5).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert ordinal.cumulative_targets(np.array([2.0]), num_grades=3).tolist() == [[1, 1]]
    for bad in ([5], [-1], [1.5], [np.nan]):
        with pytest.raises(ValueError, match="integers in 0..4"):
            ordinal.cumulative_targets(bad, num_grades=5)


def test_expected_grade_threshold_grade_and_margin_by_hand():
    cum = np.array([[0.9, 0.6, 0.2, 0.1], [0.3, 0.1, 0.0, 0.0]])
    scores = ordinal.expected_grade(cum)
    assert scores == pytest.approx([1.8, 0.4])
    assert ordinal.threshold_grades(scores, thresholds=T5).tolist() == [2, 0]
    assert ordinal.threshold_grades(scores, thresholds=[0.2, 1.9, 2.0, 3.0]).tolist() == [1, 1]  # not rounding
    assert ordinal.threshold_margin(scores, thresholds=T5) == pytest.approx([0.3, 0.1])


def test_qwk_by_hand():
    """y = [0, 0, 1, 2], predicted [0, 1, 1, 2], K = 3. Observed disagreement (weights (i-j)^2/4):
    one row off by one, 0.25. Expected from the marginals [2, 1, 1] x [1, 2, 1] / 4: 1.25.
    kappa = 1 - 0.25 / 1.25 = 0.8."""
    assert quadratic_weighted_kappa([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(0.8)
    m = ordinal.ordinal_metrics([0, 0, 1, 2], [0.2, 0.6, 1.1, 2.0], predicted=[0, 1, 1, 2], num_grades=3)
    assert m["qwk"] == pytest.approx(0.8) and m["qwk_rounded"] == pytest.approx(0.8)
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]] and m["per_grade"] == [2, 1, 1]
    assert (m["accuracy"], m["within_one"]) == (0.75, 1.0)
    assert m["mae"] == pytest.approx((0.2 + 0.6 + 0.1 + 0.0) / 4)


def test_thresholds_fitted_on_oof_beat_rounding_by_hand():
    """y = [0, 0, 1, 1], scores [0.2, 0.7, 0.9, 1.4]. Rounding (0.5) grades [0, 1, 1, 1]: observed
    disagreement 1 of 4, expected from [2, 2] x [1, 3] / 4: 2 of 4 -> kappa 0.5. Any threshold in
    (0.7, 0.9] separates the grades: kappa 1; the search finds one there."""
    y, s = [0, 0, 1, 1], [0.2, 0.7, 0.9, 1.4]
    assert quadratic_weighted_kappa(y, ordinal.threshold_grades(s, thresholds=[0.5])) == pytest.approx(0.5)
    (t,) = ordinal.fit_thresholds(y, s, num_grades=2)
    assert 0.7 < t <= 0.9
    assert quadratic_weighted_kappa(y, ordinal.threshold_grades(s, thresholds=[t])) == 1.0


def test_fitted_thresholds_are_monotone_for_nine_grades():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 9, 61)
    s = np.clip(0.7 * y + rng.normal(0, 1.0, 61) + 1.0, 0, 8)  # compressed and shifted, as small models are
    t = ordinal.fit_thresholds(y, s, num_grades=9)
    assert len(t) == 8 and np.all(np.diff(t) > 0)
    before = quadratic_weighted_kappa(y, ordinal.threshold_grades(s, thresholds=ordinal.rounding_thresholds(9)))
    assert quadratic_weighted_kappa(y, ordinal.threshold_grades(s, thresholds=t)) >= before


def test_margin_thresholds_per_grade_by_hand():
    """Thresholds [0.5, 1.5]. Predicted grade 0: margins 0.4 (right) and 0.05 (wrong) -> 0.4;
    grade 1: 0.5 (right), 0.1 (wrong) -> 0.5; grade 2: 0.7 (right) -> 0.7 (target accuracy 1)."""
    scores, truth = [0.1, 0.45, 1.0, 1.4, 2.2], [0, 1, 1, 2, 2]
    m = ordinal.margin_thresholds(scores, truth, thresholds=[0.5, 1.5], num_grades=3, target_accuracy=1.0)
    assert m == pytest.approx([0.4, 0.5, 0.7])
    m = ordinal.margin_thresholds([0.1], [0], thresholds=[0.5, 1.5], num_grades=3, target_accuracy=1.0)
    assert m[0] == pytest.approx(0.4) and np.isinf(m[1:]).all()  # a grade nobody predicts keeps nothing


def test_select_grades_keeps_scores_far_from_a_threshold_and_balances_per_grade():
    cum = np.array([[0.9, 0.8, 0.1, 0.0],   # 1.8: grade 2, margin 0.3
                    [0.9, 0.7, 0.0, 0.0],   # 1.6: grade 2, margin 0.1
                    [0.1, 0.0, 0.0, 0.0],   # 0.1: grade 0, margin 0.4
                    [1.0, 1.0, 1.0, 0.9]])  # 3.9: grade 4, margin 0.4
    sel = ordinal.select_grades(["a", "b", "c", "d"], cum, thresholds=T5, min_margin=0.25)
    assert sel["label"].tolist() == ["grade 2", "grade 2", "grade 0", "grade 4"]
    assert sel["kept"].tolist() == [True, False, True, True]
    assert sel["confidence"].to_numpy() == pytest.approx([0.3, 0.1, 0.4, 0.4])
    per_grade = ordinal.select_grades(["a", "b", "c", "d"], cum, thresholds=T5, min_margin=[0.5, 0, 0.05, 0, 0])
    assert per_grade["kept"].tolist() == [True, True, False, True]
    balanced = pseudo.balance_classes(sel.assign(kept=True), per_class=2, seed=0)
    assert balanced.groupby("label")["copies"].sum().to_dict() == {"grade 0": 2, "grade 2": 2, "grade 4": 2}


def test_agreement_and_sampling_weights():
    assert ordinal.agreement(np.array([[0, 1, 2], [0, 2, 2]]), [0, 1, 2]).tolist() == [1.0, 0.5, 1.0]
    assert ordinal.sampling_weights([0, 0, 0, 1], num_grades=3, rule="uniform") is None
    w = ordinal.sampling_weights([0, 0, 0, 1], num_grades=3, rule="inverse_frequency")
    assert w == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])  # each grade present drawn equally often
    assert ordinal.sampling_weights([0, 2], num_grades=3, rule="weights", given=[1, 2, 4]).tolist() == [1, 4]
    with pytest.raises(ValueError, match="3 non-negative"):
        ordinal.sampling_weights([0], num_grades=3, rule="weights", given=[1, 2])


def test_validation_qwk_rounds_the_expected_grade():
    metric = validation_qwk(3)
    y = ordinal.cumulative_targets([0, 0, 1, 2], num_grades=3)
    probs = np.array([[0.1, 0.0], [0.6, 0.3], [0.9, 0.2], [1.0, 0.9]])  # expected 0.1, 0.9, 1.1, 1.9 -> 0 1 1 2
    assert metric(y, probs) == pytest.approx(0.8)


def test_weighted_sampler_draws_by_weight_through_the_training_loop():
    from cxr_noisy_student.datasets.torch_data import ClassificationDataset
    from cxr_noisy_student.loops.config import TrainConfig
    from cxr_noisy_student.loops.train import ClassifierTrainer

    images = {str(i): np.full((32, 32), 40 * i, np.uint8) for i in range(4)}
    ds = ClassificationDataset(images.__getitem__, list(images), np.zeros((4, 2), np.float32), None, None, 0.5, 0.25)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2))
    trainer = ClassifierTrainer(model, ds, None, TrainConfig(epochs=1, batch_size=2), loss="bce", metric_fn=None,
                                device="cpu", hooks=(), log=lambda _: None, seed=0, sampler_weights=[0, 0, 1, 3])
    drawn = [int(i) for batch in trainer.loader for i in batch["index"]]
    assert len(drawn) == 4 and set(drawn) <= {2, 3}
    with pytest.raises(ValueError, match="4 finite non-negative"):
        ClassifierTrainer(model, ds, None, TrainConfig(epochs=1), loss="bce", metric_fn=None, device="cpu", hooks=(),
                          log=print, seed=0, sampler_weights=[1, 1])


def test_grader_config_is_checked_at_load():
    cfg = load_config(None, ["run.tasks=classifier,grader", "grader.sampling=inverse_frequency"])
    assert cfg.run.tasks == ("classifier", "grader") and cfg.grader.num_grades == 5
    with pytest.raises(ConfigError, match="grade_weights.*5 non-negative"):
        load_config(None, ["run.tasks=classifier,grader", "grader.sampling=weights", "grader.grade_weights=1,2"])
    with pytest.raises(ConfigError, match="at least 2 grades"):
        load_config(None, ["run.tasks=classifier,grader", "grader.num_grades=1"])
    with pytest.raises(ConfigError, match="did you mean 'grade_rounding'"):
        load_config(None, ["grader.grade_roundin=nearest"])


def test_gains_and_the_final_table_carry_the_graders_qwk():
    from cxr_noisy_student.teacher_student.cycle.references import gains
    from cxr_noisy_student.teacher_student.summary import format_summary

    def rec(oof, test, **extra):
        return {"grader": {"oof": {"qwk": oof}, "test": {"qwk": test}}, **extra}

    gens = [rec(0.40, 0.30, generation=0, grader_model="t"), rec(0.55, 0.45, generation=1, grader_model="s")]
    g = gains(gens, rec(0.50, 0.40), rec(0.70, 0.60))["grader_qwk"]
    assert g["student_minus_ablation"] == pytest.approx(0.05) and g["gap_closed"] == pytest.approx(0.15 / 0.30)
    summary = {"generations": gens, "ablation": rec(0.50, 0.40, grader_model="s"), "gains": {"grader_qwk": g},
               "cycles": [{"cycle": 1, "pseudo": {"grader": {"students": {"total": 12, "precision": 0.5}}}}]}
    text = format_summary(summary)
    assert "QWK oof" in text and "grader QWK (test): student - ablation +0.050" in text
    assert any(line.split()[:4] == ["gen", "1", "s", "0.550"] and line.split()[-2:] == ["12", "0.50"]
               for line in text.splitlines())
