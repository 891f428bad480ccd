"""effdet (EfficientDet) behind the ``Detector`` interface, trained through the one ``loops.trainer.Trainer``.

``DetBenchTrain`` returns ``{"loss", "class_loss", "box_loss"}``, the loss dict the loop trains on;
``EffdetTrainer`` adds only what is effdet's: AdamW (weight decay 1e-2 on every parameter) at the
given lr with a per-step cosine schedule and no warmup, gradient clipping at 10, and the epoch with
the lowest validation loss kept (the lowest train loss without validation). Mixed precision is the
loop's own (on CUDA only; full precision on the CPU).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...datasets.atomic import write_json
from ...loops.device import resolve_device
from ...loops.trainer import ProgressHook, Trainer, cpu_state, lr_factor
from .base import Detector, LogFn, logger

WEIGHT_DECAY = 1e-2
GRAD_CLIP = 10.0


class EffdetDetector(Detector):
    """effdet EfficientDet (``tf_efficientdet_d0`` ...), trained by ``EffdetTrainer`` (AdamW + cosine).

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
        if "mean" not in self.preprocess or "std" not in self.preprocess:  # never a silent default
            raise ValueError("effdet normalises with the preprocessing's mean and std: pass "
                             "create_detector(..., preprocess=<the PreprocessConfig of the cache>)")
        self.mean, self.std = float(self.preprocess["mean"]), float(self.preprocess["std"])

    def _create(self, bench_task: str):
        """The effdet model (in its bench) at this size. Its post-processing takes the top
        ``max_detection_points`` (5000) class scores over all anchors; a small input with few
        classes has fewer (128 px, one class: 3069), so the count is capped to what exists (else
        torch.topk fails on the first validation or prediction)."""
        from effdet import create_model_from_config, get_efficientdet_config

        config = get_efficientdet_config(self.name)
        anchors = config.num_scales * len(config.aspect_ratios) * sum(
            (self.img_size // 2**level) ** 2 for level in range(config.min_level, config.max_level + 1))
        config.max_detection_points = min(config.max_detection_points, anchors * self.num_classes)
        return create_model_from_config(
            config, bench_task=bench_task, num_classes=self.num_classes, image_size=(self.img_size, self.img_size),
            pretrained=False, pretrained_backbone=False, bench_labeler=bench_task == "train",
        )

    def fit(self, train_ids, val_ids, boxes_df, load, workdir, *, epochs, batch_size, lr, img_size=None,
            randaugment_n=0, randaugment_m=0, hflip=True, device="cpu", seed=0, log=None, run_name=None,
            patience=0, warm_start=False, transform=None) -> dict:
        """As ``Detector.fit``; ``transform`` overrides the default ``detection_transform(size, n, m)``."""
        from ...augment.transforms import detection_transform
        from ...datasets.det_data import DetectionDataset

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
        bench = self._create("train")
        if warm_start:
            if self._weights is None:
                raise RuntimeError("warm_start needs a first fit of this detector")
            bench.model.load_state_dict(self._weights)
        bench = bench.to(dev)
        trainer = EffdetTrainer(bench, train_ds, val_ds, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                                device=dev, seed=int(seed), log=log or logger.info, name=run_name, patience=patience)
        trainer.train()
        self.history = trainer.history
        self._weights = cpu_state(bench.model)  # the best epoch's, which train() put back
        self._bench = None
        self._to_device(dev)
        write_json(Path(workdir) / "effdet_history.json", self.history)
        last = self.history[-1] if self.history else {}
        return {"epochs": int(epochs), "best_epoch": trainer.best_epoch + 1, "last": last}

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
        from ...datasets.boxes import from_effdet_prediction
        from ...datasets.det_data import image_tensor

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


class EffdetTrainer(Trainer):
    """effdet's side of the loop: the bench's own loss dict, AdamW + cosine, the lowest loss kept."""

    def __init__(self, bench: torch.nn.Module, train_ds: Dataset, val_ds: Dataset | None, *, epochs: int,
                 batch_size: int, lr: float, device: torch.device, seed: int, log: LogFn, name: str | None = None,
                 patience: int = 0, amp: bool = True):
        drop_last = len(train_ds) % batch_size == 1  # a batch of one breaks batch norm on 1x1 maps
        loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                            generator=torch.Generator().manual_seed(seed))
        steps = max(1, epochs * len(loader))
        optimizer = torch.optim.AdamW(bench.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps=0, total_steps=steps))
        super().__init__(bench, loader, optimizer, scheduler, epochs=epochs, device=device, grad_clip=GRAD_CLIP, name=name,
                         patience=patience, amp=amp, hooks=[ProgressHook()])
        self.val_ds, self.batch_size, self.log = val_ds, batch_size, log

    def forward(self, batch) -> tuple[dict[str, torch.Tensor], int]:
        """The bench's loss dict, under the loop's mixed precision on CUDA (bf16, or fp16 with the
        loop's GradScaler); the losses leave in float32 for the finite check and the history."""
        x, target = batch
        with self.autocast():
            losses = self.model(x.to(self.device), {k: v.to(self.device) for k, v in target.items()})
        return {k: v.float() for k, v in losses.items()}, len(x)

    def end_epoch(self) -> dict:
        """One record (train loss as the mean over steps, val loss), logged; the lowest loss is kept."""
        train_loss = float(np.mean([float(losses["loss"]) for losses, _ in self.epoch_steps]))
        lr = self.scheduler.get_last_lr()[0]
        record = {"epoch": self.epoch + 1, "epochs": self.epochs, "train/loss": train_loss, "lr": lr}
        if self.val_ds is not None:
            record["val/loss"] = self.val_loss()
        self.log(record)
        self.keep_if_best(-record.get("val/loss", record["train/loss"]))
        return record

    @torch.no_grad()
    def val_loss(self) -> float:
        """Mean over validation batches of the bench's loss, in eval mode (no augmentation, running BN)."""
        self.model.eval()
        losses = [float(self.model(x.to(self.device), {k: v.to(self.device) for k, v in t.items()})["loss"])
                  for x, t in DataLoader(self.val_ds, batch_size=self.batch_size)]
        return float(np.mean(losses))
