"""Generic training and prediction: fit with hooks, predict with TTA, checkpoints, metrics, the
cross-fit loop and resumable stages. No noisy-student idea lives here."""
from ..datasets.environment import set_offline_defaults

set_offline_defaults()
