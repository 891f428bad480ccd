"""Config: YAML + overrides into frozen dataclasses, clear errors, and the README reference in sync."""
import dataclasses
from pathlib import Path

import pytest

from cxr_noisy_student.teacher_student.config_reference import config_reference
from cxr_noisy_student.teacher_student.config import (ConfigError, EngineConfig, config_to_dict, finetune_epochs,
                                    fingerprint, ladder_value, load_config)

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detector:\n  epochs: 7\nclassifier:\n  ladder: [test_efficientnet, test_resnet]\nrun:\n  cycles: 1\n")
    cfg = load_config(path, ["detector.epochs=3", "pseudo.temperature=0.5", "classifier.train.lr=0.01"])
    assert cfg.detector.epochs == 3 and cfg.classifier.ladder == ("test_efficientnet", "test_resnet")
    assert cfg.pseudo.temperature == 0.5 and cfg.classifier.train.lr == 0.01
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("override, message", [
    ("detecter.epochs=3", "did you mean 'detector'"),
    ("detector.epoch=3", "did you mean 'epochs'"),
    ("detector.kind=yolov", "not one of ['yolo', 'effdet']"),
    ("detector.epochs=three", "not a valid int"),
    ("gate.tune_on_oof=maybe", "not a valid bool"),
    ("novalue", "must look like key.sub=value"),
])
def test_bad_keys_and_values_fail_with_a_hint(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_fingerprint_follows_content_and_ladders_repeat_their_last_rung():
    a, b = EngineConfig(), load_config(None, ["pseudo.temperature=0.5"])
    assert fingerprint(a) == fingerprint(EngineConfig()) != fingerprint(b)
    assert load_config(None, []) == a and config_to_dict(a)["run"]["cycles"] == 3
    assert ladder_value(("x", "y"), 0) == "x" and ladder_value(("x", "y"), 5) == "y"


def test_a_fine_tuning_phase_keeps_the_students_optimizer_steps():
    # 10 epochs over 40 images (10 labeled) = 400 draws; 0.3 of them last, on the 10 labeled: 12 epochs
    assert finetune_epochs(10, 40, 10, 0.3) == (7, 12)
    assert 7 * 40 + 12 * 10 == 400
    assert finetune_epochs(10, 40, 40, 0.5) == (5, 5)  # the ablation: the same images in both phases
    assert finetune_epochs(10, 40, 10, 0.0) == (10, 0) and finetune_epochs(10, 40, 0, 0.3) == (10, 0)
    assert finetune_epochs(1, 40, 10, 0.9) == (1, 4)  # never an empty phase


def test_the_fine_tuning_phase_of_a_classifier_student_reads_its_labeled_rows_only():
    import numpy as np

    from cxr_noisy_student.teacher_student.tasks.classifier import TrainingSet

    mixed = TrainingSet(["a", "b", "p", "p"], np.eye(4, 2, dtype=np.float32), np.array([1, 1, 0.5, 0.5], np.float32),
                        generation=1, pseudo_count=2, labeled_share=0.5)
    labeled = mixed.labeled_part()
    assert labeled.image_ids == ["a", "b"] and labeled.pseudo_count == 0 and labeled.generation == 1
    assert labeled.targets.tolist() == [[1, 0], [0, 1]] and labeled.weights.tolist() == [1, 1]
    assert labeled.sampler_weights() is None and mixed.sampler_weights() is not None


def test_every_key_is_documented_and_the_readme_reference_is_current():
    from cxr_noisy_student.teacher_student.config_reference import REFERENCE_END, REFERENCE_START, config_reference_markdown

    rows = config_reference()
    assert all(doc for _, _, doc in rows), [k for k, _, doc in rows if not doc]
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(REFERENCE_START), readme.index(REFERENCE_END) + len(REFERENCE_END)
    assert readme[start:end] == config_reference_markdown(), (
        "README config reference is stale: paste the output of `python run_cycle.py --config-reference`")


def test_presets_load():
    for preset in (ROOT / "teacher_student" / "presets").glob("*.yaml"):
        load_config(preset)


# ---------------------------------------------------------------------------- ranges and rules across keys


BAD_VALUES = [  # (override, what the one line says): every class of value the engine cannot run on
    ("folds.k=1", "folds.k: 1 is out of range: must be >= 2"),
    ("preprocess.size=0", "preprocess.size: 0 is out of range: must be >= 8"),
    ("classifier.train.batch_size=0", "classifier.train.batch_size: 0 is out of range: must be >= 1"),
    ("pseudo.temperature=0", "pseudo.temperature: 0.0 is out of range: must be > 0"),
    ("preprocess.std=0", "preprocess.std: 0.0 is out of range: must be > 0"),
    ("classifier.train.lr=nan", "classifier.train.lr: nan is not a finite number"),
    ("detector.lr=.inf", "detector.lr: inf is not a finite number"),
    ("classifier.train.epochs=-1", "classifier.train.epochs: -1 is out of range: must be >= 1"),
    ("run.cycles=-1", "run.cycles: -1 is out of range: must be >= 0"),
    ("pseudo.confidence=2", "pseudo.confidence: 2.0 is out of range: must be <= 1"),
    ("pseudo.target_precision=-0.1", "pseudo.target_precision: -0.1 is out of range: must be >= 0"),
    ("detector.iou_thr=0", "detector.iou_thr: 0.0 is out of range: must be > 0"),
    ("data.test_fraction=1", "data.test_fraction: 1.0 is out of range: must be < 1"),
    ("classifier.drop_rate=[0.0,1.5]", "classifier.drop_rate: [0.0, 1.5] is out of range: each value must be < 1"),
    ("augment.randaugment_m=[0,40]", "augment.randaugment_m: [0, 40] is out of range: each value must be <= 30"),
    ("data.demo_counts=[1,2]", "data.demo_counts: give 3 values, got 2"),
    ("classifier.ladder=[]", "classifier.ladder: give at least 1 value(s), got none"),
    ("preprocess.percentile_clip=[99,1]", "the low percentile must be below the high one"),
    ("run.workers=true", "run.workers: True is not a valid int"),
    ("run.out=[a,b]", "run.out: expected one str, got list"),
    ("gate.low=0.97", "gate.low 0.97 is above gate.high 0.95"),
    ("classifier.ladder=efficientnet_b99", "classifier.ladder: unknown timm model 'efficientnet_b99' (did you mean"),
    ("detector.img_size=50", "detector.img_size 50: yolo needs a multiple of 32 (e.g. 64)"),
    ("detector.ladder=tf_efficientdet_d0", "detector.ladder ['tf_efficientdet_d0']: not yolo models"),
    ("run.device=tpu", "run.device 'tpu': not a device; use auto, cpu, cuda or cuda:N"),
    ("classifier.ladder=[resnet18,resnet18]", "classifier.ladder has 2 entries but run.cycles 3 trains generations 0..3"),
    ("detector.randaugment_n=[0,1,2]", "detector.randaugment_n has 3 entries but run.cycles 3"),
    ("data.format=nifti", "data.format: 'nifti' is not one of"),
    ("run.tasks=[detector]", "run.tasks ['detector']: must start with 'classifier'"),
    ("folds=3", "folds: expected a mapping of keys, got int 3"),
    ("detector.ladder=[yolov8n.yaml", "the value is not valid YAML"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_every_bad_value_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_rules_across_keys_are_named_together_in_one_line():
    """effdet on the demo preset at 96 px: the size and the YOLO ladder are both wrong for effdet; one line says both."""
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "teacher_student" / "presets" / "demo.yaml", ["detector.kind=effdet", "detector.img_size=96"])
    message = str(info.value)
    assert "detector.img_size 96: effdet needs a multiple of 128 (e.g. 128)" in message
    assert "detector.ladder ['yolov8n.yaml']: not effdet models" in message and "\n" not in message


def test_a_setting_the_chosen_mode_would_ignore_is_refused():
    overrides = ["run.tasks=[classifier,segmenter]", "segmenter.pseudo_mode=soft", "segmenter.pixel_confidence=0.9"]
    with pytest.raises(ConfigError, match="segmenter.pixel_confidence 0.9: leaves uncertain pixels out of hard"):
        load_config(None, overrides)
    assert load_config(None, overrides[:2]).segmenter.pseudo_mode == "soft"


def test_effdet_gets_its_own_default_ladder_and_one_rung_ladders_cover_every_cycle():
    cfg = load_config(None, ["detector.kind=effdet"])
    assert cfg.detector.ladder == ("tf_efficientdet_d0", "tf_efficientdet_d1", "tf_efficientdet_d2",
                                   "tf_efficientdet_d2")
    assert load_config(None, ["detector.kind=yolo"]).detector.ladder[0] == "yolov8n.yaml"
    assert load_config(None, ["run.cycles=9", "classifier.ladder=resnet18", "classifier.drop_rate=0.1",
                              "classifier.drop_path_rate=0", "augment.randaugment_n=2", "augment.randaugment_m=9",
                              "detector.enabled=false"]).run.cycles == 9
    assert load_config(None, ["run.cycles=9", "detector.enabled=false", "classifier.ladder=resnet18",
                              "classifier.drop_rate=0", "classifier.drop_path_rate=0", "augment.randaugment_n=0",
                              "augment.randaugment_m=0"]).detector.ladder[0] == "yolov8n.yaml"  # off: not checked


def test_config_files_that_cannot_be_read_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  format: demo\n   root: x\n")
    cases = [(bad, "bad.yaml: not valid YAML: mapping values are not allowed here at line 3, column 8"),
             (tmp_path, "is a folder, not a YAML config file"), (tmp_path / "none.yaml", "config file not found")]
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    cases.append((tmp_path / "list.yaml", "expected a mapping of sections"))
    for path, message in cases:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
