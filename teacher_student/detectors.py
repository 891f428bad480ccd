"""One detector interface, two real adapters: ultralytics YOLO and effdet (EfficientDet).

Why an interface: the cycle (teachers -> OOF -> pseudo boxes -> students) must not care which
library trains the boxes. Every adapter reads the same cached uint8 (size, size) images through
``load(image_id)``, takes and returns boxes in the engine convention (normalized xyxy, 0-based
class), and writes one checkpoint that carries what prediction needs (kind, model name, class
names, input size, preprocessing, the cache image shape) so prediction never restates them by hand.

Prediction returns one row per box and view ("orig", "hflip"); hflip boxes are already mapped back
to the original image with ``datasets.boxes.hflip``. The caller fuses views x folds with
``teacher_student.fusion.fuse_boxes``. Classes that name a side ("Right Lung") must not be trained
or predicted with horizontal flips: pass ``hflip=False`` to ``fit`` and ``tta_hflip=False``.

Checkpoints are ``torch.save`` of plain types + tensors (a state dict, never a pickled module), so
``load_detector`` uses ``torch.load(weights_only=True)``; the YOLO module is rebuilt from its YAML
dict and the effdet module from its name.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import albumentations as A
import numpy as np
import pandas as pd
import torch

from ..datasets.boxes import BOX_COLUMNS, hflip
from ..datasets.det_data import check_image
from ..datasets.errors import DataError
from ..datasets.atomic import atomic_path, write_json

PREDICTION_COLUMNS = ["image_id", "class_id", *BOX_COLUMNS, "score", "view"]
CHECKPOINT_FORMAT = 1
KINDS = ("yolo", "effdet")
LoadFn = Callable[[str], np.ndarray]
LogFn = Callable[[dict], None]
_logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None -> cuda when available, else cpu; anything else as torch understands it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def empty_predictions() -> pd.DataFrame:
    """The prediction table with no rows, with the right columns and dtypes."""
    cols = {"image_id": pd.Series(dtype="str"), "class_id": pd.Series(dtype="int64")}
    cols.update({c: pd.Series(dtype="float32") for c in BOX_COLUMNS})
    cols.update({"score": pd.Series(dtype="float32"), "view": pd.Series(dtype="str")})
    return pd.DataFrame(cols)[PREDICTION_COLUMNS]


class Detector(abc.ABC):
    """Train on a fold, predict boxes with flip TTA, save/load a self-describing checkpoint.

    Subclasses implement ``fit``, ``_predict_arrays`` (one batch of uint8 images -> boxes),
    ``_state`` / ``_restore`` (what goes into the checkpoint) and ``_to_device``.
    """

    kind: str = ""

    def __init__(self, name: str, num_classes: int, class_names: Sequence[str], img_size: int, preprocess: dict | None = None):
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.name, self.num_classes = str(name), int(num_classes)
        self.class_names = [str(c) for c in class_names]
        self.img_size = 0
        self._set_img_size(img_size)
        self.preprocess = dict(preprocess or {})
        self.input_shape: tuple[int, int] | None = None
        """Shape of the cache images seen in training; prediction checks its images against it."""
        self.device = torch.device("cpu")
        self.history: list[dict] = []

    size_multiple: int = 32
    """Input sizes must be a multiple of the model's largest stride."""

    def _set_img_size(self, img_size: int | None) -> None:
        if img_size is None:
            return
        if int(img_size) <= 0 or int(img_size) % self.size_multiple:
            raise ValueError(f"{self.kind} img_size must be a positive multiple of {self.size_multiple}, got {img_size}")
        self.img_size = int(img_size)

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def fit(
        self,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
        boxes_df: pd.DataFrame,
        load: LoadFn,
        workdir: str | Path,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        img_size: int | None = None,
        randaugment_n: int = 0,
        randaugment_m: float = 0,
        hflip: bool = True,
        device: str | torch.device | None = "cpu",
        seed: int = 0,
        log: LogFn | None = None,
    ) -> dict:
        """Train on ``train_ids`` (boxes from ``boxes_df``; an image without rows is a negative).

        Returns a summary dict (epochs run, best epoch, last metrics). Writes only under ``workdir``.
        """

    def _remember_input(self, load: LoadFn, image_id: str) -> None:
        self.input_shape = tuple(int(s) for s in check_image(load(image_id), image_id).shape)

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        image_ids: Sequence[str],
        load: LoadFn,
        *,
        tta_hflip: bool = True,
        conf_floor: float = 0.01,
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ) -> pd.DataFrame:
        """Boxes for every image and view, scores >= ``conf_floor``, in the engine convention.

        Boxes that end with zero area after clipping to the image (predicted wholly outside it)
        are not returned: they are no box at all, and ``fuse_boxes`` would reject them.
        """
        if device is not None:
            self._to_device(resolve_device(device))
        views = ["orig", "hflip"] if tta_hflip else ["orig"]
        parts = []
        ids = [str(i) for i in image_ids]
        for start in range(0, len(ids), max(1, batch_size)):
            batch_ids = ids[start : start + batch_size]
            images = [self._checked_image(load(i), i) for i in batch_ids]
            for view in views:
                batch = images if view == "orig" else [np.ascontiguousarray(im[:, ::-1]) for im in images]
                outputs = self._predict_arrays(batch, conf_floor=conf_floor)
                parts.extend(_rows(batch_ids, outputs, view))
        if not parts:
            return empty_predictions()
        return pd.concat(parts, ignore_index=True)[PREDICTION_COLUMNS]

    def _checked_image(self, image: np.ndarray, image_id: str) -> np.ndarray:
        image = check_image(image, image_id)
        if self.input_shape is not None and tuple(image.shape) != self.input_shape:
            raise DataError(
                f"image {image_id}: cache image is {image.shape} but this detector was trained on {self.input_shape} "
                "images: the preprocessing differs from training"
            )
        return image

    @abc.abstractmethod
    def _predict_arrays(self, images: list[np.ndarray], *, conf_floor: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """uint8 (H, W) images -> per image (normalized xyxy (N, 4), scores (N,), 0-based classes (N,))."""

    @abc.abstractmethod
    def _to_device(self, device: torch.device) -> None: ...

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (temporary name, then rename)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "img_size": self.img_size,
            "preprocess": _plain(self.preprocess),
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "history": _plain(self.history),
            **self._state(),
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    @abc.abstractmethod
    def _state(self) -> dict: ...

    @abc.abstractmethod
    def _restore(self, ckpt: dict) -> None: ...


def _rows(image_ids: list[str], outputs: list[tuple], view: str) -> list[pd.DataFrame]:
    frames = []
    for image_id, (boxes, scores, classes) in zip(image_ids, outputs):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if view == "hflip":
            boxes = hflip(boxes)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep.any():
            continue
        df = pd.DataFrame(boxes[keep], columns=BOX_COLUMNS)
        df.insert(0, "class_id", np.asarray(classes, np.int64)[keep])
        df.insert(0, "image_id", image_id)
        df["score"] = np.asarray(scores, np.float32)[keep]
        df["view"] = view
        frames.append(df)
    return frames


def _plain(obj: Any) -> Any:
    """Tensors/numpy scalars -> Python numbers, tuples -> lists: what weights_only loading accepts."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# ============================================================================ YOLO (ultralytics)


MOSAIC_MIN_SIZE = 256
"""Mosaic puts four images in one, halving every object. Below this input size small lesions fall
under ultralytics' 2-pixel box filter and the student trains on images whose boxes vanished
(measured on the 64 px demo: student box loss ~1e-4 with mosaic, the teacher's ~1 without)."""


def yolo_augment_overrides(*, img_size: int, n: int, m: float, hflip: bool, epochs: int) -> dict:
    """RandAugment N/M -> ultralytics train hyperparameters.

    The RandAugment ops themselves are the project's box-safe list
    (``augment.transforms.detection_transform``), passed through ultralytics' ``augmentations``
    hyperparameter; ultralytics wraps them in its own Compose with YOLO bbox params, after its
    letterbox/affine step, so boxes follow. Ultralytics' own colour jitter is off (radiographs are
    gray: hue/saturation do nothing), its affine is off (the list above has rotate/shear/translate/
    scale), flips follow ``hflip``; mosaic grows with M for students (0 for teachers: n == 0) and is
    closed for the last quarter of the epochs (at most 10), when the model settles on whole images.
    """
    from ..augment.transforms import M_MAX, detection_transform

    f = min(max(float(m), 0.0), M_MAX) / M_MAX if n > 0 else 0.0
    if img_size < MOSAIC_MIN_SIZE:
        f = 0.0
    ops = [t for t in detection_transform(img_size, int(n), float(m) if n > 0 else 0, hflip=False).transforms
           if not isinstance(t, A.Resize)]  # ultralytics has already letterboxed to img_size
    return {
        "augmentations": ops,
        "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0,
        "degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0, "perspective": 0.0,
        "flipud": 0.0, "fliplr": 0.5 if hflip else 0.0,
        "mosaic": round(min(1.0, 2.0 * f), 3), "mixup": 0.0, "cutmix": 0.0, "copy_paste": 0.0,
        "close_mosaic": min(10, max(0, epochs // 4)),
    }


@contextlib.contextmanager
def _offline_ultralytics(device: torch.device):
    """Stop the two network calls ultralytics makes while training with everything local.

    ``check_det_dataset`` always calls ``check_font("Arial.ttf")``, which sends a HEAD request to
    GitHub even with YOLO_OFFLINE=1 (the font is only used to draw plots, and we train with
    plots=False). On CUDA the AMP self-test loads ``yolo26n.pt``, downloading it when absent; we
    skip that self-test and trust AMP on CUDA (ultralytics' list of GPUs with broken AMP is old
    GTX 16xx / T-series cards; pass device="cpu" or fix amp there). Both are restored on exit.
    """
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer_mod

    saved = (data_utils.check_font, trainer_mod.check_amp)
    data_utils.check_font = lambda *args, **kwargs: None
    trainer_mod.check_amp = lambda model: device.type == "cuda"
    try:
        with _torch_globals_kept():
            yield
    finally:
        data_utils.check_font, trainer_mod.check_amp = saved


@contextlib.contextmanager
def _torch_globals_kept():
    """Undo the process-wide torch settings ultralytics changes.

    Its device selection calls ``torch.set_num_threads(cpu_count - 1)`` (one thread on a 2-core
    machine) and its seeding toggles deterministic algorithms. Left alone, everything trained
    after the first YOLO call in a process runs at half speed, and a resumed run (which skips
    that YOLO call) rounds differently from an uninterrupted one. YOLO itself runs with the
    caller's thread count, the cores the user gave the engine.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    import ultralytics.utils.torch_utils as torch_utils

    saved_threads = torch_utils.NUM_THREADS
    torch_utils.NUM_THREADS = threads
    try:
        yield
    finally:
        torch_utils.NUM_THREADS = saved_threads
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _ultralytics_device(device: torch.device) -> str:
    if device.type == "cuda":
        return str(device.index or 0)
    return device.type


def _single_channel(data_yaml: Path) -> Path:
    """Add ``channels: 1`` to an export's data.yaml: ultralytics then reads the PNGs as gray
    (H, W, 1) and builds a 1-channel model, as the timm classifiers are."""
    import yaml

    data = yaml.safe_load(data_yaml.read_text())
    data["channels"] = 1
    with atomic_path(data_yaml) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return data_yaml


class YoloDetector(Detector):
    """ultralytics YOLO, trained with ``YOLO(name).train(**overrides)`` on a YOLO export of the fold.

    ``name`` is an ultralytics YAML ("yolov8n.yaml": the model scale comes from the name, so the
    ladder yolov8n -> s -> m is a list of names) or a local ``.pt`` to start from. Single channel:
    the export's data.yaml gets ``channels: 1``, so ultralytics reads the gray PNGs as (H, W, 1)
    (not as 3 identical BGR channels), builds a 1-channel first convolution, and runs the project's
    transforms on the same one-channel arrays they are written for; prediction feeds (H, W, 1).
    """

    kind = "yolo"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yolo = None
        self._yaml: dict | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self.weights_path: Path | None = None
        """best.pt written by the ultralytics trainer (inside workdir), for reference."""

    def fit(self, train_ids, val_ids, boxes_df, load, workdir, *, epochs, batch_size, lr, img_size=None,
            randaugment_n=0, randaugment_m=0, hflip=True, device="cpu", seed=0, log=None) -> dict:
        from ultralytics import YOLO

        workdir = Path(workdir).resolve()
        self._set_img_size(img_size)
        dev = resolve_device(device)
        self._remember_input(load, str(train_ids[0]))
        data_yaml = self._export(train_ids, val_ids, boxes_df, load, workdir / "yolo_data")
        model = YOLO(self.name)
        self.history = []
        model.add_callback("on_fit_epoch_end", self._epoch_logger(log))
        overrides = dict(
            data=str(data_yaml), epochs=int(epochs), batch=int(batch_size), imgsz=self.img_size, lr0=float(lr),
            optimizer="AdamW", cos_lr=True, device=_ultralytics_device(dev), workers=0 if dev.type == "cpu" else 2,
            seed=int(seed), deterministic=True, amp=dev.type == "cuda", plots=False, project=str(workdir),
            name="yolo_train", exist_ok=True, verbose=False, val=True, cache=False,
            warmup_epochs=min(3.0, 0.1 * int(epochs)),
            **yolo_augment_overrides(img_size=self.img_size, n=randaugment_n, m=randaugment_m, hflip=hflip, epochs=int(epochs)),
        )
        with _offline_ultralytics(dev):
            model.train(**overrides)
        self.weights_path = Path(model.trainer.best if model.trainer.best.exists() else model.trainer.last)
        # model.train() reloaded the best weights with ultralytics' own loader (weights_only=False on a
        # file this run wrote); from here on we keep a plain state dict + YAML dict.
        self._yaml = _plain(copy.deepcopy(model.model.yaml))
        self._weights = _cpu_state(model.model)
        self._yolo = None
        self._to_device(dev)
        return {"epochs": len([h for h in self.history if not h.get("final")]), "weights": str(self.weights_path),
                "last": self.history[-1] if self.history else {}}

    def _export(self, train_ids, val_ids, boxes_df, load, out_dir: Path) -> Path:
        """YOLO export of this fold (datasets.export); without val images it validates on train."""
        from ..datasets.export import export_yolo

        split = {**{str(i): "train" for i in train_ids}, **{str(i): "val" for i in val_ids}}
        items = pd.DataFrame({"image_id": list(split)})
        boxes = boxes_df[boxes_df["image_id"].astype(str).isin(set(split))]
        return _single_channel(Path(export_yolo(items, boxes, self.class_names, load, out_dir, split_of=split)))

    def _epoch_logger(self, log: LogFn | None):
        def on_fit_epoch_end(trainer) -> None:
            final = trainer.epoch >= trainer.epochs  # ultralytics' last call: validation of best.pt
            record = {"epoch": min(int(trainer.epoch) + 1, int(trainer.epochs)), "epochs": int(trainer.epochs), "final": final}
            if getattr(trainer, "tloss", None) is not None:
                record.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
            record.update(trainer.metrics or {})
            record = _plain(record)
            self.history.append(record)
            (log or _logger.info)(record)

        return on_fit_epoch_end

    @property
    def channels(self) -> int:
        """Input channels of the trained module (1; 3 for a model started from a 3-channel .pt)."""
        return int((self._yaml or {}).get("channels", 1))

    def _module(self):
        """A detection module built from the saved YAML dict and loaded with the saved weights."""
        from ultralytics.nn.tasks import DetectionModel

        module = DetectionModel(cfg=copy.deepcopy(self._yaml), ch=self.channels, nc=self.num_classes, verbose=False)
        module.load_state_dict(self._weights)
        module.names = dict(enumerate(self.class_names))
        return module.float().eval()

    def _to_device(self, device: torch.device) -> None:
        if self._yolo is None or device != self.device:
            from ultralytics import YOLO

            if self._weights is None:
                raise RuntimeError("this YOLO detector has no weights: fit() or load_detector() first")
            shell = YOLO("yolov8n.yaml", task="detect")  # an ultralytics front end; its module is replaced
            module = self._module().to(device)
            module.args, module.task = {**shell.model.args, "imgsz": self.img_size}, "detect"
            shell.model = module
            self._yolo = shell
        self.device = device

    def _predict_arrays(self, images, *, conf_floor):
        if self._yolo is None:
            self._to_device(self.device)
        arrays = [np.repeat(im[:, :, None], self.channels, axis=2) for im in images]  # (H, W, 1), or gray BGR
        with _torch_globals_kept():
            results = self._yolo.predict(
                arrays, imgsz=self.img_size, conf=conf_floor, iou=0.6, device=_ultralytics_device(self.device),
                verbose=False, save=False, batch=len(arrays),
            )
        out = []
        for r in results:
            b = r.boxes
            out.append((b.xyxyn.cpu().numpy(), b.conf.cpu().numpy(), b.cls.cpu().numpy().astype(np.int64)))
        return out

    def _state(self) -> dict:
        if self._weights is None:
            raise RuntimeError("nothing to save: fit() this detector first")
        return {"model_yaml": self._yaml, "state_dict": self._weights, "weights_path": str(self.weights_path or "")}

    def _restore(self, ckpt: dict) -> None:
        self._yaml, self._weights = ckpt["model_yaml"], ckpt["state_dict"]
        self.weights_path = Path(ckpt["weights_path"]) if ckpt.get("weights_path") else None


# ============================================================================ effdet (EfficientDet)


class EffdetDetector(Detector):
    """effdet EfficientDet (``tf_efficientdet_d0`` ...), trained with a short AdamW + cosine loop.

    The image size must be a multiple of 128 (effdet's feature pyramid goes to stride 2**7) and is
    written into the effdet config. No pretrained weights are loaded (offline engine). Targets and
    predictions cross the effdet convention only at the edge (``datasets.det_data`` /
    ``datasets.boxes.from_effdet_prediction``): pixel y,x,y,x boxes and classes from 1 inside.
    """

    kind = "effdet"
    size_multiple = 128  # the feature pyramid goes down to stride 2**7

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._weights: dict[str, torch.Tensor] | None = None
        self._bench = None
        self.mean = float(self.preprocess.get("mean", 0.5))
        self.std = float(self.preprocess.get("std", 0.25))

    def _create(self, bench_task: str):
        import effdet

        return effdet.create_model(
            self.name, bench_task=bench_task, num_classes=self.num_classes, image_size=(self.img_size, self.img_size),
            pretrained=False, pretrained_backbone=False, bench_labeler=bench_task == "train",
        )

    def fit(self, train_ids, val_ids, boxes_df, load, workdir, *, epochs, batch_size, lr, img_size=None,
            randaugment_n=0, randaugment_m=0, hflip=True, device="cpu", seed=0, log=None, transform=None) -> dict:
        """As ``Detector.fit``; ``transform`` overrides the default ``detection_transform(size, n, m)``."""
        from ..augment.transforms import detection_transform
        from ..datasets.det_data import DetectionDataset

        if len(train_ids) < 2:
            raise ValueError("effdet training needs at least 2 images (batch norm on 1x1 feature maps)")
        self._set_img_size(img_size)
        dev = resolve_device(device)
        torch.manual_seed(seed)
        self._remember_input(load, str(train_ids[0]))
        if transform is None:
            transform = detection_transform(self.img_size, int(randaugment_n), float(randaugment_m), hflip=hflip, seed=seed)
        def make(ids, t):
            return DetectionDataset(load, ids, boxes_df, t, self.mean, self.std, size=self.img_size, num_classes=self.num_classes)

        train_ds, val_ds = make(train_ids, transform), make(val_ids, None) if len(val_ids) else None
        bench = self._create("train").to(dev)
        result = _train_effdet(bench, train_ds, val_ds, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                               device=dev, seed=int(seed), log=log or _logger.info)
        self.history = result.pop("history")
        self._weights = result.pop("weights")
        self._bench = None
        self._to_device(dev)
        write_json(Path(workdir) / "effdet_history.json", self.history)
        return {**result, "last": self.history[-1] if self.history else {}}

    def _to_device(self, device: torch.device) -> None:
        if self._bench is None or device != self.device:
            from effdet import DetBenchPredict

            if self._weights is None:
                raise RuntimeError("this effdet detector has no weights: fit() or load_detector() first")
            model = self._create("")
            model.load_state_dict(self._weights)
            self._bench = DetBenchPredict(model).eval().to(device)
        self.device = device

    @torch.no_grad()
    def _predict_arrays(self, images, *, conf_floor):
        from ..datasets.boxes import from_effdet_prediction
        from ..datasets.det_data import image_tensor

        if self._bench is None:
            self._to_device(self.device)
        x = torch.stack([image_tensor(im, size=self.img_size, mean=self.mean, std=self.std) for im in images])
        detections = self._bench(x.to(self.device)).cpu().numpy()  # (B, max_det, 6): x1 y1 x2 y2 score class(1-based)
        out = []
        for det in detections:
            det = det[det[:, 4] >= conf_floor]
            out.append((from_effdet_prediction(det[:, :4], self.img_size), det[:, 4], det[:, 5].astype(np.int64) - 1))
        return out

    def _state(self) -> dict:
        if self._weights is None:
            raise RuntimeError("nothing to save: fit() this detector first")
        return {"state_dict": self._weights}

    def _restore(self, ckpt: dict) -> None:
        self._weights = ckpt["state_dict"]


def _train_effdet(bench, train_ds, val_ds, *, epochs, batch_size, lr, device, seed, log) -> dict:
    """AdamW + per-step cosine schedule; keeps the weights of the epoch with the lowest val loss."""
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    drop_last = len(train_ds) % batch_size == 1  # a batch of one breaks batch norm on 1x1 maps
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator)
    steps = max(1, epochs * len(loader))
    optimizer = torch.optim.AdamW(bench.parameters(), lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history, best, best_loss, weights = [], 0, math.inf, None
    for epoch in range(1, epochs + 1):
        bench.train()
        losses = []
        for x, target in loader:
            out = bench(x.to(device), {k: v.to(device) for k, v in target.items()})
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(bench.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            losses.append(float(out["loss"].detach()))
        record = {"epoch": epoch, "epochs": epochs, "train/loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0]}
        if val_ds is not None:
            record["val/loss"] = _effdet_val_loss(bench, val_ds, batch_size=batch_size, device=device)
        history.append(record)
        log(record)
        score = record.get("val/loss", record["train/loss"])
        if score < best_loss or weights is None:
            best, best_loss, weights = epoch, score, _cpu_state(bench.model)
    return {"history": history, "weights": weights, "epochs": epochs, "best_epoch": best}


@torch.no_grad()
def _effdet_val_loss(bench, ds, *, batch_size, device) -> float:
    from torch.utils.data import DataLoader

    bench.eval()
    losses = [float(bench(x.to(device), {k: v.to(device) for k, v in t.items()})["loss"]) for x, t in DataLoader(ds, batch_size=batch_size)]
    return float(np.mean(losses))


# ============================================================================ factory and loading

_CLASSES = {"yolo": YoloDetector, "effdet": EffdetDetector}


def create_detector(
    kind: Literal["yolo", "effdet"],
    name: str,
    num_classes: int,
    class_names: Sequence[str],
    img_size: int,
    *,
    preprocess: Any = None,
) -> Detector:
    """A new, untrained detector. ``preprocess``: the PreprocessConfig (or its dict) of the cache."""
    if kind not in _CLASSES:
        raise ValueError(f"detector kind must be one of {KINDS}, got {kind!r}")
    if dataclasses.is_dataclass(preprocess):
        preprocess = dataclasses.asdict(preprocess)
    return _CLASSES[kind](name, num_classes, class_names, img_size, _plain(preprocess or {}))


def load_detector(path: str | Path, device: str | torch.device | None = "cpu") -> Detector:
    """Rebuild a detector from its checkpoint (``torch.load(weights_only=True)``) on ``device``."""
    from ..loops.checkpoint import safe_torch_load

    ckpt = safe_torch_load(path, "detector checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("kind") not in _CLASSES:
        raise DataError(f"{path}: not a detector checkpoint of format {CHECKPOINT_FORMAT}")
    det = create_detector(ckpt["kind"], ckpt["name"], ckpt["num_classes"], ckpt["class_names"], ckpt["img_size"], preprocess=ckpt["preprocess"])
    det.input_shape = tuple(ckpt["input_shape"]) if ckpt.get("input_shape") else None
    det.history = list(ckpt.get("history") or [])
    det._restore(ckpt)
    det._to_device(resolve_device(device))
    return det
