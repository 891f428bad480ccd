"""Config of the generic training loop (ground floor: imports nothing of the project).

Field ``metadata`` declares each value's range (see ``datasets.config``), checked at load."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of the classifier fit loop."""

    epochs: int = field(default=10, metadata={"ge": 1})
    """Training epochs (of teachers; students and references get a multiple of their steps)."""
    batch_size: int = field(default=32, metadata={"ge": 1})
    """Images per step."""
    lr: float = field(default=1e-3, metadata={"gt": 0})
    """Peak learning rate (after linear warmup, then cosine decay)."""
    weight_decay: float = field(default=1e-2, metadata={"ge": 0})
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw or sgd (Nesterov momentum 0.9)."""
    warmup_epochs: float = field(default=1.0, metadata={"ge": 0})
    """Linear warmup length in epochs."""
    ema_decay: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """0 disables the exponential moving average of weights."""
    grad_clip: float = field(default=5.0, metadata={"ge": 0})
    """Gradient norm clipping; 0 disables it."""
    patience: int = field(default=0, metadata={"ge": 0})
    """Early stopping patience in epochs on the validation metric; 0 disables it."""
    keep: Literal["best", "last"] = "best"
    """Which weights a fit returns: the epoch with the best validation metric, or the last epoch.
    Why last: picking the epoch on the fold whose out-of-fold predictions then choose pseudo-label
    thresholds makes those predictions optimistic (measured on the demo: thresholds chosen for 0.85
    precision kept pseudo labels 0.69-0.73 precise); the last epoch's predictions are not selected."""
    amp: bool = True
    """Mixed precision and channels_last, used only on CUDA."""
    workers: int = field(default=0, metadata={"ge": 0})
    """DataLoader worker processes (0: load in the training process)."""
