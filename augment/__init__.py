"""Transform factories by role: teacher (light), student (RandAugment N/M), detection-safe, TTA."""
from ..datasets.environment import set_offline_defaults

set_offline_defaults()
