"""ultralytics YOLO behind the ``Detector`` interface, and the guards its process-wide side effects need.

Wrapped, never subclassed: ``YOLO(name).train(**overrides)`` with its callbacks and its
``augmentations`` hyperparameter. ultralytics changes process-wide state during its calls (torch's
thread count, deterministic algorithms) and makes network calls even offline; the context managers
here (``_offline_ultralytics``, ``_torch_globals_kept``) undo or stop both around every call.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch

from ...datasets.atomic import atomic_path
from ...loops.trainer import cpu_state
from ...loops.device import resolve_device
from .base import Detector, LogFn, logger, plain_types


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
    from ...augment.transforms import M_MAX, detection_transform

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


class _StepProgress:
    """A ``datasets.progress`` bar over a YOLO training's batches, fed by ultralytics' callbacks
    (its own per-batch output is off: YOLO_VERBOSE=False). The total is read from the trainer on
    the first batch (epochs x batches per epoch, known only once ultralytics built its loader)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def step(self, trainer) -> None:
        if self.bar is None:
            from ...datasets.progress import Progress

            self.bar = Progress(int(trainer.epochs) * len(trainer.train_loader), self.desc, "step")
        self.bar.update(1)
        losses = getattr(trainer, "tloss", None)  # running mean losses: a dict (a tensor in older versions)
        if losses is not None:
            total = sum(float(v) for v in losses.values()) if isinstance(losses, dict) else float(losses.sum())
            self.bar.note(epoch=f"{int(trainer.epoch) + 1}/{int(trainer.epochs)}", loss=total)

    def __enter__(self) -> "_StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _ultralytics_device(device: torch.device) -> str:
    if device.type == "cuda":
        return str(device.index or 0)
    return device.type


def gpu_list(device: str) -> str | None:
    """"0,1,2" (``detector.devices``): the GPUs of ultralytics' own multi-GPU training; None for one device."""
    text = str(device).replace(" ", "")
    return text if "," in text and all(part.isdigit() for part in text.split(",")) else None


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
            randaugment_n=0, randaugment_m=0, hflip=True, device="cpu", seed=0, log=None, run_name=None,
            patience=0, warm_start=False) -> dict:
        """As ``Detector.fit``; ultralytics checks its own losses, so ``run_name`` is not used.

        One batch is one optimizer step (``nbs`` = the batch size). Why: ultralytics accumulates
        gradients up to a nominal batch of 64 images, which on a small fold (60 images, batch 8)
        leaves one optimizer step per epoch -- 30 steps in 30 epochs -- and the detector learns
        nothing (measured on the demo at 128 px: test mAP@0.5 0.08 with the default, 0.41 with
        nbs = batch). Weight decay is scaled by ultralytics against the same nbs, so it stays as set.
        Validation runs every epoch only when early stopping needs it (``patience`` > 0): it costs
        about 40% more CPU, and otherwise ultralytics validates the final weights once.
        """
        from ultralytics import YOLO

        workdir = Path(workdir).resolve()
        self._set_img_size(img_size)
        gpus = gpu_list(device)
        dev = resolve_device("cuda:" + gpus.split(",")[0] if gpus else device, key="detector.devices")
        self._remember_input(load, str(train_ids[0]))
        data_yaml = self._export(train_ids, val_ids, boxes_df, load, workdir / "yolo_data")
        if warm_start and self.weights_path is None:
            raise RuntimeError("warm_start needs a first fit of this detector")
        model = YOLO(str(self.weights_path) if warm_start else self.name)  # a checkpoint this run wrote
        self.history = []
        bar = _StepProgress(run_name or f"yolo {self.name}")
        if not gpus:  # ultralytics' DDP workers rebuild the trainer elsewhere: this process's hooks cannot go along
            model.add_callback("on_fit_epoch_end", self._epoch_logger(log))
            model.add_callback("on_train_batch_end", bar.step)
        overrides = dict(
            data=str(data_yaml), epochs=int(epochs), batch=int(batch_size), nbs=int(batch_size), imgsz=self.img_size,
            lr0=float(lr), patience=int(patience),
            optimizer="AdamW", cos_lr=True, device=gpus or _ultralytics_device(dev), workers=0 if dev.type == "cpu" else 2,
            seed=int(seed), deterministic=True, amp=dev.type == "cuda", plots=False, project=str(workdir),
            name="yolo_train", exist_ok=True, verbose=False, val=patience > 0, cache=False,
            warmup_epochs=min(3.0, 0.1 * int(epochs)),
            **yolo_augment_overrides(img_size=self.img_size, n=randaugment_n, m=randaugment_m, hflip=hflip, epochs=int(epochs)),
        )
        with _offline_ultralytics(dev), bar:
            model.train(**overrides)
        self.weights_path = Path(model.trainer.best if model.trainer.best.exists() else model.trainer.last)
        # model.train() reloaded the best weights with ultralytics' own loader (weights_only=False on a
        # file this run wrote); from here on we keep a plain state dict + YAML dict.
        self._yaml = plain_types(copy.deepcopy(model.model.yaml))
        self._weights = cpu_state(model.model)
        self._yolo = None
        self._to_device(dev)
        return {"epochs": len([h for h in self.history if not h.get("final")]), "weights": str(self.weights_path),
                "last": self.history[-1] if self.history else {}}

    def _export(self, train_ids, val_ids, boxes_df, load, out_dir: Path) -> Path:
        """YOLO export of this fold (datasets.export); without val images it validates on train."""
        from ...datasets.export import export_yolo

        split = {**{str(i): "train" for i in train_ids}, **{str(i): "val" for i in val_ids}}
        items = pd.DataFrame({"image_id": list(split)})
        boxes = boxes_df[boxes_df["image_id"].astype(str).isin(set(split))]
        return _single_channel(Path(export_yolo(items, boxes, self.class_names, load, out_dir, split_of=split)))

    def _epoch_logger(self, log: LogFn | None):
        """Keep and log one record per epoch. ultralytics calls on_fit_epoch_end once more after the
        last epoch, for its validation of best.pt: that record is kept (marked ``final``) but not
        logged, or the last epoch's line would appear twice."""
        def on_fit_epoch_end(trainer) -> None:
            final = trainer.epoch >= trainer.epochs or any(h.get("epoch") == trainer.epoch + 1 for h in self.history)
            record = {"epoch": min(int(trainer.epoch) + 1, int(trainer.epochs)), "epochs": int(trainer.epochs), "final": final}
            if getattr(trainer, "tloss", None) is not None:
                record.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
            if getattr(trainer.args, "val", True) or record["epoch"] == record["epochs"]:
                record.update(trainer.metrics or {})  # without val, only the last epoch's are measured, not zeros
            record = plain_types(record)
            self.history.append(record)
            if not final:
                (log or logger.info)(record)

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
