"""Workarounds that let RecBole 1.2.1 run on today's Python stack.

Imported by ``recbole_darec/__init__.py`` before anything touches ``recbole``. Each workaround names the
breakage it covers; delete it once RecBole ships a fix.
"""

from __future__ import annotations

import numpy as np

# numpy 2 removed these aliases; RecBole's Config.compatibility_settings reads np.float_ & co. at start-up.
_NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "bool8": np.bool_}
for _name, _value in _NUMPY_ALIASES.items():
    if not hasattr(np, _name):
        setattr(np, _name, _value)

# Never import recbole.quick_start: it imports ray 2.6.3, which needs pkg_resources (gone from setuptools>=81)
# and np.bool8. The plugin has its own quick_start (recbole_darec.quick_start).

# torch>=2.6 defaults torch.load to weights_only=True, and RecBole pickles its Config into every checkpoint, so
# Trainer.evaluate(load_best_model=True) fails. Our trainer (recbole_darec.trainer) loads the checkpoints it
# wrote itself with this helper instead of patching torch globally.


def load_trusted_checkpoint(path: str, map_location=None) -> dict:
    """Load a checkpoint written by this plugin's trainer (full pickle: only for files you trust)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=False)
