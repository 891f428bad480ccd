"""The noisy-student ideas: task kinds, models and detectors, pseudo-label maths, fusion, the gate,
the cycle and its stages, the report and the exports."""
from ..datasets.environment import set_offline_defaults

set_offline_defaults()

__version__ = "0.1.0"
"""The engine's version: ``run_cycle.py --version`` prints it and setup.py reads it from here."""
