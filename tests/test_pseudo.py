"""Pseudo-label maths against hand-computed values."""
import numpy as np
import pandas as pd
import pytest

from cxr_noisy_student.teacher_student import pseudo


def test_sharpen_multiclass_matches_hand_computation():
    p = np.array([[0.6, 0.3, 0.1]])
    out = pseudo.sharpen(p, temperature=0.5, mode="multiclass")
    expected = np.array([0.36, 0.09, 0.01]) / 0.46  # p^2 renormalised
    np.testing.assert_allclose(out[0], expected, rtol=1e-5)
    np.testing.assert_allclose(pseudo.sharpen(p, temperature=1.0, mode="multiclass"), p.astype(np.float32))


def test_sharpen_multilabel_is_per_class_logit_scaling():
    p = np.array([[0.8, 0.5, 0.2]])
    out = pseudo.sharpen(p, temperature=0.5, mode="multilabel")
    # logit(0.8) = ln 4; / 0.5 -> ln 16 -> 16/17
    np.testing.assert_allclose(out[0], [16 / 17, 0.5, 1 / 17], rtol=1e-5)


def test_bad_probabilities_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        pseudo.sharpen(np.array([[0.5, 0.5]]), temperature=0, mode="multiclass")
    with pytest.raises(ValueError, match="NaN"):
        pseudo.sharpen(np.array([[np.nan, 0.5]]), temperature=1, mode="multiclass")
    with pytest.raises(ValueError, match="shapes differ"):
        pseudo.blend_targets(np.eye(2), np.ones((3, 2)) / 2, weight=0.3)


def test_blend_targets():
    gt = np.array([[1.0, 0.0]])
    oof = np.array([[0.2, 0.8]])
    np.testing.assert_allclose(pseudo.blend_targets(gt, oof, weight=0.25), [[0.8, 0.2]])


def test_precision_threshold_picks_lowest_threshold_reaching_target():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, False])
    # precision at >=0.9: 1, >=0.8: 1, >=0.7: 2/3, >=0.6: 3/4, >=0.5: 3/5
    assert pseudo.precision_threshold(scores, correct, target_precision=0.75) == pytest.approx(0.6)
    assert pseudo.precision_threshold(scores, correct, target_precision=0.9) == pytest.approx(0.8)
    assert pseudo.precision_threshold(scores, correct, target_precision=1.0) == pytest.approx(0.8)
    assert pseudo.precision_threshold(scores[2:3], correct[2:3], target_precision=0.5) == np.inf
    curve = pseudo.precision_curve(scores, correct)
    np.testing.assert_allclose(curve["recall"], [1 / 3, 2 / 3, 2 / 3, 1, 1])


def test_class_thresholds_multiclass():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    truth = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    thr = pseudo.class_thresholds(probs, truth, target_precision=1.0, mode="multiclass")
    assert thr[0] == pytest.approx(0.9)  # 0.7 is wrong, so only >= 0.9 is pure
    assert thr[1] == pytest.approx(0.8)


def test_select_and_balance():
    ids = [f"u{i}" for i in range(6)]
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.85, 0.15], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    sel = pseudo.select_pseudo(ids, probs, mode="multiclass", class_names=["normal", "abnormal"], confidence=0.6)
    assert sel["kept"].tolist() == [True, True, True, True, True, False]
    bal = pseudo.balance_classes(sel, per_class=2, seed=0)
    # 'normal' has 4 kept -> keeps its 2 most confident; 'abnormal' has 1 -> duplicated to 2 copies
    assert sorted(bal[bal["label"] == "normal"]["image_id"]) == ["u0", "u1"]
    assert bal.set_index("image_id").loc["u4", "copies"] == 2
    assert bal.groupby("label")["copies"].sum().to_dict() == {"abnormal": 2, "normal": 2}


def test_balance_default_is_median_and_remainder_is_sampled():
    sel = pd.DataFrame({"image_id": [f"i{i}" for i in range(8)], "label": list("aaaaabbc"),
                        "confidence": np.linspace(1, 0.5, 8), "kept": True})
    bal = pseudo.balance_classes(sel, seed=1)
    assert bal.groupby("label")["copies"].sum().to_dict() == {"a": 2, "b": 2, "c": 2}


def test_thresholds_from_oof_used_per_class():
    sel = pseudo.select_pseudo(["a", "b"], np.array([[0.7, 0.3], [0.2, 0.8]]), mode="multiclass",
                               class_names=["x", "y"], thresholds=np.array([0.75, 0.5]))
    assert sel["kept"].tolist() == [False, True]


def test_box_thresholds_and_negatives():
    matched = pd.DataFrame({"class_id": [0, 0, 0, 1], "score": [0.9, 0.6, 0.4, 0.3],
                            "true_positive": [True, True, False, False]})
    thr = pseudo.box_thresholds(matched, num_classes=3, target_precision=0.9)
    assert thr[0] == pytest.approx(0.6) and np.isinf(thr[1]) and np.isinf(thr[2])
    fused = pd.DataFrame({"image_id": ["a", "a", "b"], "class_id": [0, 0, 0], "x_min": 0.1, "y_min": 0.1,
                          "x_max": 0.2, "y_max": 0.2, "score": [0.7, 0.5, 0.5]})
    p = pd.Series({"a": 0.9, "b": 0.1, "c": 0.6})
    boxes, images = pseudo.select_pseudo_boxes(fused, ["a", "b", "c"], p, thresholds=thr, negative_max_p_abnormal=0.2)
    assert len(boxes) == 1 and boxes["score"].iloc[0] == 0.7
    assert images.set_index("image_id")["status"].to_dict() == {"a": "boxes", "b": "negative", "c": "uncertain"}


def test_gate_hard_and_soft():
    boxes = pd.DataFrame({"image_id": ["lo", "mid", "hi"], "class_id": [3, 3, 3], "x_min": 0.1, "y_min": 0.1,
                          "x_max": 0.3, "y_max": 0.3, "score": [0.5, 0.5, 0.5]})
    p = pd.Series({"lo": 0.05, "mid": 0.5, "hi": 0.99})
    hard = pseudo.gate_predictions(boxes, p, no_finding_class=14, low=0.08, high=0.95, mode="hard")
    by = {k: g for k, g in hard.groupby("image_id")}
    assert by["lo"]["class_id"].tolist() == [14] and by["lo"]["score"].tolist() == [1.0]
    assert sorted(by["mid"]["class_id"]) == [3, 14]
    assert by["mid"].set_index("class_id").loc[14, "score"] == pytest.approx(0.5)
    assert by["hi"]["class_id"].tolist() == [3]
    soft = pseudo.gate_predictions(boxes, p, no_finding_class=14, low=0.08, high=0.95, mode="soft")
    hi = soft[soft["image_id"] == "hi"].set_index("class_id")["score"]
    assert hi[3] == pytest.approx(0.5 * 0.99) and hi[14] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="low <= high"):
        pseudo.gate_predictions(boxes, p, no_finding_class=14, low=0.9, high=0.1)


def test_an_empty_unlabeled_pool_selects_nothing():
    """A dataset whose every image is labeled (the shared cxr set) has no classification pool."""
    sel = pseudo.select_pseudo([], np.zeros((0, 3)), mode="multiclass", class_names=["a", "b", "c"], confidence=0.5)
    assert sel.empty and list(sel.columns)[:2] == ["image_id", "label"]
    assert pseudo.balance_classes(sel).empty
    assert pseudo.sharpen(np.zeros((0, 3)), temperature=0.5, mode="multiclass").shape == (0, 3)


# ----------------------------------------------------------------------------- starving classes


def _selection(rows):
    return pd.DataFrame(rows, columns=["image_id", "label", "class_index", "confidence", "threshold", "kept"])


def test_threshold_support_counts_the_oof_predictions_each_threshold_is_read_from():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    assert pseudo.threshold_support(probs, mode="multiclass").tolist() == [2, 1]
    assert pseudo.threshold_support(probs, mode="multilabel").tolist() == [3, 3]


def test_starving_classes_name_empty_and_weakly_supported_classes():
    sel = _selection([("a", "n", 0, 0.9, 0.5, True), ("b", "n", 0, 0.6, 0.5, True), ("c", "x", 1, 0.8, 0.9, False)])
    assert pseudo.starving_classes(sel, np.array([20, 20]), num_classes=2, min_support=10) == {
        1: "no pool image reaches its threshold"}
    starving = pseudo.starving_classes(sel, np.array([20, 1]), num_classes=2, min_support=10)
    assert starving == {1: "threshold rests on 1 OOF prediction(s) (< 10)"}


def test_top_k_fallback_keeps_the_k_most_confident_of_a_starving_class_only():
    sel = _selection([("a", "n", 0, 0.9, 0.5, True), ("b", "x", 1, 0.7, 0.95, False), ("c", "x", 1, 0.8, 0.95, False),
                      ("d", "x", 1, 0.6, 0.95, False)])
    out = pseudo.top_k_fallback(sel, [1], k=2)
    assert out.set_index("image_id")["kept"].to_dict() == {"a": True, "b": True, "c": True, "d": False}
    assert out.set_index("image_id")["rule"].to_dict() == {"a": "threshold", "b": "top_k", "c": "top_k", "d": ""}


def test_fallback_size_is_the_median_kept_count_of_the_other_classes():
    sel = _selection([(f"n{i}", "n", 0, 0.9, 0.5, True) for i in range(6)]
                     + [(f"m{i}", "m", 1, 0.9, 0.5, True) for i in range(2)] + [("x", "x", 2, 0.5, 0.9, False)])
    assert pseudo.fallback_size(sel, [2]) == 4  # median of 6 and 2
    assert pseudo.fallback_size(sel, [2], fixed=7) == 7
    assert pseudo.fallback_size(sel.iloc[-1:], [2]) == 1


def test_box_fallback_thresholds_keep_the_top_k_boxes_of_a_starving_class():
    fused = pd.DataFrame({"image_id": list("abcd"), "class_id": [0, 1, 1, 1], "score": [0.9, 0.3, 0.5, 0.4]})
    out = pseudo.top_k_box_thresholds(fused, np.array([0.8, np.inf]), [1], k=2)
    assert out.tolist() == [0.8, 0.4]
    assert np.isinf(pseudo.top_k_box_thresholds(fused, np.array([0.8, np.inf]), [1], k=0)[1])
    matched = pd.DataFrame({"class_id": [0] * 12 + [1] * 3, "score": [0.9] * 12 + [0.5] * 3})
    kept = fused[fused["score"] >= 0.8]
    support = pseudo.box_threshold_support(matched, np.array([0.8, np.inf]), num_classes=2)
    assert support.tolist() == [12, 3]
    assert pseudo.box_starving_classes(support, kept, num_classes=2, min_support=10) == {
        1: "threshold rests on 3 OOF box(es) (< 10)"}


def test_box_fallbacks_top_k_drop_and_none():
    fused = pd.DataFrame({"image_id": list("abcde"), "class_id": [0, 0, 1, 1, 1], "score": [0.9, 0.85, 0.3, 0.5, 0.4]})
    thresholds = np.array([0.8, 0.45])
    kept = fused[fused["score"] >= thresholds[fused["class_id"]]]
    # class 1 is starving (say its 0.45 rests on 3 OOF boxes): top_k with k=0 keeps as many as the
    # median of the others (class 0 keeps 2), drop keeps none, none keeps what 0.45 keeps
    assert pseudo.box_fallback_thresholds(fused, kept, thresholds, [1], fallback="top_k").tolist() == [0.8, 0.4]
    dropped = pseudo.box_fallback_thresholds(fused, kept, thresholds, [1], fallback="drop")
    assert dropped[0] == 0.8 and np.isinf(dropped[1]) and thresholds[1] == 0.45  # the input is kept
    assert pseudo.box_fallback_thresholds(fused, kept, thresholds, [1], fallback="none") is thresholds


def test_box_support_counts_the_oof_boxes_at_or_above_the_threshold_not_every_box():
    """Class 0: 20 OOF boxes, 4 of them at or above its threshold 0.6 -- the precision behind the
    threshold is read off those 4; class 1 reaches no threshold: its support is every box it has."""
    matched = pd.DataFrame({"class_id": [0] * 20 + [1] * 7,
                            "score": [0.9, 0.7, 0.6, 0.6] + [0.2] * 16 + [0.3] * 7})
    support = pseudo.box_threshold_support(matched, np.array([0.6, np.inf, np.inf]), num_classes=3)
    assert support.tolist() == [4, 7, 0]
    kept = pd.DataFrame({"class_id": [0, 0]})
    assert pseudo.box_starving_classes(support, kept, num_classes=3, min_support=5, present=[0, 1]) == {
        0: "threshold rests on 4 OOF box(es) (< 5)", 1: "no pool box reaches its threshold"}


def test_an_image_with_a_lesion_the_teacher_was_unsure_of_is_left_out():
    """a: one kept box and one unsure (0.3 >= floor 0.2, < its threshold 0.9): partial, left out;
    b: one kept box, the other below the floor: usable; c: nothing from the floor up, normal: a
    negative; d: an unsure box only: uncertain, not a negative even though P(abnormal) is low."""
    fused = pd.DataFrame({"image_id": ["a", "a", "b", "b", "c", "d"], "class_id": [0, 1, 0, 1, 1, 1],
                          "x_min": 0.1, "y_min": 0.1, "x_max": 0.3, "y_max": 0.3,
                          "score": [0.8, 0.3, 0.7, 0.1, 0.05, 0.4]})
    p = pd.Series({"a": 0.9, "b": 0.9, "c": 0.05, "d": 0.05})
    boxes, images = pseudo.select_pseudo_boxes(fused, list("abcd"), p, thresholds=np.array([0.5, 0.9]),
                                               negative_max_p_abnormal=0.2, uncertain_floor=0.2)
    assert images.set_index("image_id")["status"].to_dict() == {"a": "partial", "b": "boxes", "c": "negative",
                                                                "d": "uncertain"}
    assert boxes["image_id"].tolist() == ["b"] and images.set_index("image_id").loc["a", "n_unsure"] == 1


def test_labeled_share_weights_give_ground_truth_its_share_of_the_draws():
    w = pseudo.labeled_share_weights([False, False, True, True, True, True], share=0.5)
    np.testing.assert_allclose(w, [0.25, 0.25, 0.125, 0.125, 0.125, 0.125])  # 2 x 0.25 = 4 x 0.125 = half
    assert pseudo.labeled_share_weights([False, True], share=0.0) is None  # off: every image once per epoch
    assert pseudo.labeled_share_weights([False, False], share=0.5) is None  # no pseudo mask: nothing to share with
    with pytest.raises(ValueError, match="labeled share"):
        pseudo.labeled_share_weights([False, True], share=1.0)


def test_a_classifier_training_set_draws_its_labeled_rows_at_their_share():
    from cxr_noisy_student.teacher_student.tasks.classifier import TrainingSet

    ts = TrainingSet(["a", "b", "p", "p", "q"], np.zeros((5, 2)), np.ones(5), pseudo_count=3, labeled_share=0.5)
    np.testing.assert_allclose(ts.sampler_weights(), [0.25, 0.25, 1 / 6, 1 / 6, 1 / 6])
    assert ts.fingerprint_payload()["labeled_share"] == 0.5
    plain = TrainingSet(["a", "p"], np.zeros((2, 2)), np.ones(2), pseudo_count=1)
    assert plain.sampler_weights() is None and "labeled_share" not in plain.fingerprint_payload()
