"""Config: YAML + overrides into frozen dataclasses, clear errors, and the README reference in sync."""
import dataclasses
from pathlib import Path

import pytest

from cxr_noisy_student.teacher_student.config import (ConfigError, EngineConfig, config_reference, config_to_dict, fingerprint,
                                    ladder_value, load_config)

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detector:\n  epochs: 7\nclassifier:\n  ladder: [a, b]\n")
    cfg = load_config(path, ["detector.epochs=3", "pseudo.temperature=0.5", "classifier.train.lr=0.01"])
    assert cfg.detector.epochs == 3 and cfg.classifier.ladder == ("a", "b")
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


def test_every_key_is_documented_and_the_readme_reference_is_current():
    from cxr_noisy_student.teacher_student.config import REFERENCE_END, REFERENCE_START, config_reference_markdown

    rows = config_reference()
    assert all(doc for _, _, doc in rows), [k for k, _, doc in rows if not doc]
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(REFERENCE_START), readme.index(REFERENCE_END) + len(REFERENCE_END)
    assert readme[start:end] == config_reference_markdown(), (
        "README config reference is stale: paste the output of `python run_cycle.py --config-reference`")


def test_presets_load():
    for preset in (ROOT / "teacher_student" / "presets").glob("*.yaml"):
        load_config(preset)
