"""recbole-darec: DARec (arXiv 2408.07427) as a RecBole plugin."""

from recbole_darec import compat  # noqa: F401  (must run before anything imports recbole)

__version__ = "0.1.0"
