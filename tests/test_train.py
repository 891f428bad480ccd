"""fit / predict / checkpoint / dataset with a real tiny timm model on a separable synthetic task."""
import math

import numpy as np
import pytest
import torch

from cxr_noisy_student.augment.transforms import student_transform, teacher_transform
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.torch_data import ClassificationDataset
from cxr_noisy_student.loops.checkpoint import CheckpointError, preprocess_from_meta, save_checkpoint
from cxr_noisy_student.teacher_student.models import load_classifier
from cxr_noisy_student.loops.metrics import classification_metrics
from cxr_noisy_student.loops.predict import predict_probs
from cxr_noisy_student.loops.train import fit, sample_losses, weighted_loss
from cxr_noisy_student.loops.trainer import Hook, NonFiniteLossError, ProgressHook, lr_factor
from cxr_noisy_student.loops.config import TrainConfig
from cxr_noisy_student.datasets.config import PreprocessConfig, config_to_dict
from cxr_noisy_student.teacher_student.models import create_classifier

MODEL = "test_efficientnet"  # 0.1 M parameters, has BatchNorm (the case precise BN is for)
SIZE = 32
PP = PreprocessConfig(size=SIZE, mean=0.4, std=0.3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def square_task(n: int, prefix: str, seed: int):
    """Class 1 images hold a bright square somewhere in the centre region, class 0 do not."""
    rng = np.random.default_rng(seed)
    arrays, labels = {}, []
    for i in range(n):
        img = rng.integers(0, 70, (SIZE, SIZE)).astype(np.uint8)
        if i % 2:
            r, c = rng.integers(6, 14, 2)
            img[r:r + 12, c:c + 12] += 150
        arrays[f"{prefix}{i}"] = img
        labels.append(i % 2)
    return arrays, np.eye(2, dtype=np.float32)[labels]


@pytest.fixture(scope="module")
def task():
    train, y_train = square_task(64, "t", 0)
    val, y_val = square_task(32, "v", 1)
    arrays = {**train, **val}
    return {"load": arrays.__getitem__, "train": list(train), "y_train": y_train, "val": list(val), "y_val": y_val}


def datasets(task, transform=None):
    train = ClassificationDataset(task["load"], task["train"], task["y_train"], None, transform, PP.mean, PP.std)
    val = ClassificationDataset(task["load"], task["val"], task["y_val"], None, None, PP.mean, PP.std)
    return train, val


def accuracy(y, p):
    return classification_metrics(y, p, ["neg", "pos"], "multiclass")["accuracy"]


CFG = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=0.5, workers=0)


@pytest.fixture(scope="module")
def trained(task):
    torch.manual_seed(0)
    model = create_classifier(MODEL, 2)
    train, val = datasets(task, teacher_transform(SIZE))
    lines = []
    result = fit(model, train, val, CFG, loss="softmax", metric_fn=accuracy, device="cpu", seed=0, log=lines.append)
    return model, result, lines, val


# ------------------------------------------------------------------------------ losses


def test_soft_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    targets = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    lse = [math.log(math.e ** 1 + math.e ** 2 + 1), math.log(math.e ** 0.5 + math.e ** -1 + math.e ** 3)]
    expected = [-(0.2 * (1 - lse[0]) + 0.8 * (2 - lse[0])), -(3 - lse[1])]
    assert sample_losses(logits, targets, kind="softmax").tolist() == pytest.approx(expected, rel=1e-5)
    weights = torch.tensor([1.0, 0.5])
    assert weighted_loss(logits, targets, weights, kind="softmax").item() == pytest.approx((expected[0] + 0.5 * expected[1]) / 2, rel=1e-5)


def test_soft_bce_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[0.3, 0.9]])
    sig = 1 / (1 + math.exp(-2.0))
    per_class = [-(0.3 * math.log(0.5) + 0.7 * math.log(0.5)), -(0.9 * math.log(sig) + 0.1 * math.log(1 - sig))]
    assert sample_losses(logits, targets, kind="bce").item() == pytest.approx(sum(per_class) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="softmax' or 'bce"):
        sample_losses(logits, targets, kind="mse")


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, warmup_steps=4, total_steps=20) for s in range(21)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[12] == pytest.approx(0.5)  # half way through the cosine
    assert f[20] == pytest.approx(0.0) and all(a >= b for a, b in zip(f[3:], f[4:]))


# ------------------------------------------------------------------------------ fit


def test_fit_learns_separable_task_and_returns_best_weights(trained):
    model, result, lines, val = trained
    assert result.epochs_run == 4 and len(lines) == 4 and "val_loss" in lines[0]
    assert result.best_metric >= 0.9  # chance is 0.5
    assert result.best_metric == max(h["metric"] for h in result.history)
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.best_state[key]), key
    probs = predict_probs(model, val, device="cpu", batch_size=16, tta_hflip=False)
    assert accuracy(val.targets, probs) == pytest.approx(result.best_metric)


def test_fit_is_deterministic_with_a_seed(task):
    states = []
    for _ in range(2):
        torch.manual_seed(123)  # same init; fit reseeds everything else from seed=7
        model = create_classifier(MODEL, 2, drop_rate=0.2, drop_path_rate=0.1)
        train, _ = datasets(task, student_transform(SIZE, 2, 9))
        fit(model, train, None, TrainConfig(epochs=1, batch_size=16, workers=0), loss="softmax", device="cpu", seed=7, log=lambda s: None)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def before_train(self, t):
        self.events.append("before_train")

    def before_epoch(self, t):
        self.events.append("before_epoch")

    def after_step(self, t):
        assert set(t.losses) == {"loss"} and torch.isfinite(t.losses["loss"])
        self.events.append("step")

    def after_epoch(self, t):
        self.events.append("after_epoch")

    def after_train(self, t):
        self.events.append("after_train")


def test_early_stopping_keeps_best_epoch_and_hooks_fire_in_order(task):
    scores = iter([0.9, 0.1, 0.2, 0.3, 0.4])  # epoch 1 is best; patience 1 stops after epoch 2
    rec, snapshots = Recorder(), []

    class Snapshot(Hook):
        def after_epoch(self, t):
            snapshots.append({k: v.clone() for k, v in t.model.state_dict().items()})

    torch.manual_seed(0)
    model = create_classifier(MODEL, 2)
    train, val = datasets(task)
    cfg = TrainConfig(epochs=5, batch_size=32, patience=1, ema_decay=0.0, workers=0)
    result = fit(model, train, val, cfg, loss="softmax", metric_fn=lambda y, p: next(scores), device="cpu", hooks=[rec, Snapshot()], log=lambda s: None)
    assert result.epochs_run == 2 and result.best_metric == 0.9
    assert rec.events == ["before_train", "before_epoch", "step", "step", "after_epoch", "before_epoch", "step", "step", "after_epoch", "after_train"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshots[0].items())  # epoch 1, BN stats included


def test_fit_without_validation_keeps_last_weights_with_ema_and_bce(task):
    torch.manual_seed(0)
    model = create_classifier(MODEL, 2)
    train, _ = datasets(task)
    cfg = TrainConfig(epochs=2, batch_size=16, ema_decay=0.9, optimizer="sgd", lr=0.05, workers=0)
    progress = ProgressHook(every=1)
    result = fit(model, train, None, cfg, loss="bce", device="cpu", hooks=[progress], log=lambda s: None)
    assert result.best_metric is None and result.epochs_run == 2
    assert progress.bar.n == progress.bar.total == 8  # one bar over the fit: 2 epochs x 4 steps
    assert all("val_loss" not in h and np.isfinite(h["train_loss"]) for h in result.history)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in result.best_state.items())


def test_non_finite_loss_stops_fit_with_one_line(task):
    torch.manual_seed(0)
    model = create_classifier(MODEL, 2)
    train, _ = datasets(task)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=float("inf"), warmup_epochs=0, workers=0)  # step 1 ruins the weights
    with pytest.raises(NonFiniteLossError) as err:
        fit(model, train, None, cfg, loss="softmax", device="cpu", log=lambda s: None)
    assert str(err.value) == ("training loss is nan at step 2 (epoch 1/2); stopped instead of training on: "
                              "lower the learning rate or check the inputs")


# ------------------------------------------------------------------------------ predict


def test_hflip_tta_is_the_mean_of_both_views(trained):
    model, _, _, val = trained
    x = torch.stack([val[i]["image"] for i in range(len(val))])
    model.eval()
    with torch.no_grad():
        manual = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
        plain = model(x).sigmoid()
    tta = predict_probs(model, val, device="cpu", batch_size=8, tta_hflip=True, activation="softmax")
    assert np.allclose(tta, manual.numpy(), atol=1e-5)
    single = predict_probs(model, val, device="cpu", batch_size=8, tta_hflip=False, activation="sigmoid")
    assert np.allclose(single, plain.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_gives_identical_predictions_and_preprocessing(trained, tmp_path):
    model, _, _, val = trained
    meta = {"model_name": MODEL, "num_classes": 2, "class_names": ["neg", "pos"], "drop_rate": 0.0, "drop_path_rate": 0.0,
            "preprocess": PP, "activation": "softmax", "label_mode": "multiclass", "ordinal_thresholds": None,
            "config": config_to_dict(CFG)}
    path = save_checkpoint(tmp_path / "fold0" / "checkpoint.pt", model, meta)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    loaded, meta2 = load_classifier(path, "cpu")
    assert not loaded.training and preprocess_from_meta(meta2) == PP
    assert meta2["preprocess"]["percentile_clip"] == [0.5, 99.5] and meta2["config"]["batch_size"] == 16
    before = predict_probs(model, val, device="cpu", batch_size=16)
    after = predict_probs(loaded, val, device="cpu", batch_size=16, activation=meta2["activation"])
    assert np.array_equal(before, after)


def test_bad_checkpoints_give_one_line_errors(trained, tmp_path):
    model, _, _, _ = trained
    meta = {"model_name": MODEL, "num_classes": 2, "class_names": ["neg", "pos"], "preprocess": PP, "activation": "softmax"}
    good = save_checkpoint(tmp_path / "good.pt", model, meta)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    wrong = save_checkpoint(tmp_path / "wrong.pt", create_classifier(MODEL, 3), {**meta, "num_classes": 3, "class_names": ["a", "b", "c"]})
    raw = torch.load(wrong, weights_only=True)
    raw["meta"]["num_classes"], raw["meta"]["class_names"] = 2, ["neg", "pos"]
    torch.save(raw, wrong)
    cases = {tmp_path / "missing.pt": "not found", corrupt: "corrupt, truncated", wrong: "do not fit"}
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=words) as err:
            load_classifier(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="missing \\['std'\\]"):
        preprocess_from_meta({"preprocess": {"size": 32, "percentile_clip": [0, 100], "mean": 0.5}})
    with pytest.raises(ValueError, match="lacks \\['activation'\\]"):
        save_checkpoint(tmp_path / "x.pt", model, {k: v for k, v in meta.items() if k != "activation"})


# ------------------------------------------------------------------------------ dataset


def test_classification_dataset_items_and_bad_input(task):
    load = {"white": np.full((SIZE, SIZE), 255, np.uint8), "float": np.zeros((SIZE, SIZE), np.float32)}.__getitem__
    ds = ClassificationDataset(load, ["white"], [[0.25, 0.75]], [0.5], None, mean=0.5, std=0.25)
    item = ds[0]
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"], torch.tensor(2.0))  # (1 - 0.5) / 0.25
    assert item["target"].tolist() == [0.25, 0.75] and item["weight"] == 0.5 and item["index"] == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=1)))
    assert batch["target"].dtype == batch["weight"].dtype == torch.float32 and batch["index"].dtype == torch.int64
    with pytest.raises(DataError, match="image float: loader returned float32"):
        ClassificationDataset(load, ["float"], [[1.0, 0.0]], None, None, 0.5, 0.25)[0]
    with pytest.raises(DataError, match="image b: target has NaN"):
        ClassificationDataset(load, ["a", "b"], [[1.0, 0.0], [np.nan, np.nan]], None, None, 0.5, 0.25)
    with pytest.raises(ValueError, match="weights must have N=1"):
        ClassificationDataset(load, ["white"], [[1.0, 0.0]], [1.0, 1.0], None, 0.5, 0.25)
