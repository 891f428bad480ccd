"""The data layer: readers, the item table, format adapters, the preprocessing cache, folds, torch
datasets and the built-in demo. Its ground-floor modules (``errors``, ``environment``, ``atomic``,
``config``) import nothing of the project; every other layer may import them."""
from .environment import set_offline_defaults

set_offline_defaults()
