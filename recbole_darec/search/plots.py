"""The PNG of an architecture search: the metric of every trial and the best so far, one colour per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recbole_darec.search.trial_log import Trial


def plot_search(histories: dict[str, Sequence[Trial]], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: the metric of every trial (dots) and the best so far (line), one colour per history."""
    # The OO API with an explicit Agg canvas works headless and leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, trials) in enumerate(histories.items()):
        color = f"C{i}"
        x = [t.index + 1 for t in trials]
        y = [t.value for t in trials]
        best_so_far = np.fmax.accumulate(np.asarray(y, dtype=float)) if y else []
        ax.plot(x, y, "o", color=color, alpha=0.45, markersize=4)
        label = f"{name} (best {np.nanmax(best_so_far):.4g})" if y else name
        ax.step(x, best_so_far, where="post", color=color, label=label)
        first_bo = next((t.index + 1 for t in trials if t.method == "bo"), None)
        if first_bo is not None:
            ax.axvline(first_bo - 0.5, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation metric")
    ax.set_title(title or "architecture search: metric per trial (dots) and best so far (line)")
    ax.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
