"""Dynamic-adaption architecture search: Bayesian optimisation over per-layer serial/parallel adapters.

`run_search` drives a search against any objective callable on 0/1 layer vectors; trials go to a resumable
JSON-lines `TrialLog`. `search_architecture` runs it on DARec: a weight-sharing supernet (`Supernet`) scores each
candidate by one validation pass (supernet.py); `plot_search` draws the trials (plots.py).
"""

from recbole_darec.model.adapters import arch_to_str, str_to_arch
from recbole_darec.search.bo import (
    SearchResult,
    all_binary,
    best_trial,
    fit_gp,
    make_acqf,
    optimize_acqf_exhaustive,
    optimize_acqf_probabilistic_reparam,
    propose_bo,
    run_search,
    trial_seed,
)
from recbole_darec.search.plots import plot_search
from recbole_darec.search.supernet import (
    SearchPaths,
    Supernet,
    build_supernet,
    describe_arch,
    search_architecture,
    search_paths,
    supernet_config,
)
from recbole_darec.search.trial_log import Trial, TrialLog

__all__ = [
    "SearchPaths",
    "SearchResult",
    "Supernet",
    "Trial",
    "TrialLog",
    "all_binary",
    "arch_to_str",
    "best_trial",
    "build_supernet",
    "describe_arch",
    "fit_gp",
    "make_acqf",
    "optimize_acqf_exhaustive",
    "optimize_acqf_probabilistic_reparam",
    "plot_search",
    "propose_bo",
    "run_search",
    "search_architecture",
    "search_paths",
    "str_to_arch",
    "supernet_config",
    "trial_seed",
]
