"""Workarounds that let RecBole 1.2.1 run on today's Python stack.

Imported by ``recbole_darec/__init__.py`` before anything touches ``recbole``. Each workaround names the
breakage it covers; delete it once RecBole ships a fix.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

# numpy 2 removed these aliases; RecBole's Config.compatibility_settings reads np.float_ & co. at start-up.
_NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "bool8": np.bool_}
for _name, _value in _NUMPY_ALIASES.items():
    if not hasattr(np, _name):
        setattr(np, _name, _value)

# scipy>=1.12 keeps a dok_matrix's entries in ``_dict`` and dropped ``dok_matrix._update`` (the unchecked bulk
# insert), which RecBole's graph models (LightGCN, NGCF, ...) call to build their adjacency matrix:
# "'dok_matrix' object has no attribute '_update'". Restore it with its old meaning.
import scipy.sparse as _sparse  # noqa: E402  (after the numpy aliases, like every other import of scipy here)

if not hasattr(_sparse.dok_matrix, "_update"):

    def _dok_update(self, data: dict) -> None:
        self._dict.update(data)

    _sparse.dok_matrix._update = _dok_update

# Never import recbole.quick_start: it imports ray 2.6.3, which needs pkg_resources (gone from setuptools>=81)
# and np.bool8. The plugin has its own quick_start (recbole_darec.quick_start).

# torch>=2.6 defaults torch.load to weights_only=True, and RecBole pickles its Config into every checkpoint, so
# Trainer.evaluate(load_best_model=True) fails. Our trainer (recbole_darec.trainer) loads the checkpoints it
# wrote itself with this helper instead of patching torch globally.


def load_trusted_checkpoint(path: str, map_location=None) -> dict:
    """Load a checkpoint written by this plugin's trainer (full pickle: only for files you trust).

    A file that is not one (cut short by an interrupted copy, or another kind of file) is a ValueError that names
    it, not torch's unpickling traceback."""
    import pickle
    import zipfile

    import torch

    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError,
            AttributeError, ImportError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:120]}); it may be "
                         "truncated (an interrupted copy or run) or another kind of file: give a .pth written by "
                         "run_darec.py.") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint: give a .pth written by "
                         "run_darec.py.")
    return checkpoint


_anomaly_detection_undone = False


def undo_recbole_anomaly_detection() -> None:
    """Switch off the autograd anomaly detection that importing RecBole's sequential models switches on.

    ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)`` at import
    time, and ``recbole.model.sequential_recommender`` imports it, so every model trained after any sequential
    model was looked up records a stack trace per op and checks every backward for NaN (slower, and a NaN
    aborts training). Called by ``recbole_darec.utils.get_model``; acts once, so a user's own later
    ``set_detect_anomaly(True)`` stays in force.
    """
    global _anomaly_detection_undone
    import sys

    if not _anomaly_detection_undone and "recbole.model.sequential_recommender.sine" in sys.modules:
        import torch

        torch.autograd.set_detect_anomaly(False)
        _anomaly_detection_undone = True


def fix_recbole_hyper_tuning() -> None:
    """Make ``recbole.trainer.HyperTuning`` work with hyperopt 0.3 and numpy 2 (idempotent; call before use)."""
    import types

    from recbole.trainer import hyper_tuning

    original = hyper_tuning.exhaustive_search
    if getattr(original, "_darec_fixed", False):
        return
    # hyperopt>=0.2.7 samples with Generator methods (rng.integers), RecBole's algo='exhaustive' passes a RandomState.
    numpy_for_it = types.SimpleNamespace(random=types.SimpleNamespace(RandomState=np.random.default_rng))
    fixed = types.FunctionType(
        original.__code__, {**original.__globals__, "np": numpy_for_it}, original.__name__, original.__defaults__
    )
    fixed._darec_fixed = True
    hyper_tuning.exhaustive_search = fixed
    # numpy 2 removed np.str; HyperTuning.plot_hyper (display_file) casts trial numbers with it.
    if "str" not in np.__dict__:
        np.str = str

# pandas>=2.2 warns on every chained ``feat[field].fillna(value, inplace=True)`` in RecBole's Dataset
# (_fill_nan_flag): one multi-line FutureWarning per field and run, flooding logs and test output. RecBole's own
# line, not ours: silence exactly that message from recbole's modules.
warnings.filterwarnings("ignore", message=r"A value is trying to be set on a copy of a DataFrame or Series "
                        r"through chained assignment using an inplace method", category=FutureWarning,
                        module=r"recbole\.")


# recbole.utils.ensure_dir checks, then creates (``if not os.path.exists(d): os.makedirs(d)``): when several
# processes start together (DDP ranks, parallel benchmark rows) one of them loses the race with FileExistsError.
# Its callers (logger, Trainer, data_preparation, Dataset.save) bound the function by name at import, so its code
# is replaced in place: every caller gets the race-free version.
def _ensure_dir(dir_path: str) -> None:
    os.makedirs(dir_path, exist_ok=True)


def _fix_recbole_ensure_dir() -> None:
    from recbole.utils import utils as recbole_utils

    recbole_utils.ensure_dir.__code__ = _ensure_dir.__code__  # reads ``os`` from recbole's module: imported there


_fix_recbole_ensure_dir()
