"""Transform factories by role: teacher (light), student (RandAugment N/M), detection-safe, TTA."""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import
