"""Dynamic-adaption architecture search: Bayesian optimisation over per-layer serial/parallel adapters.

`run_search` drives a search against any objective callable on 0/1 layer vectors; trials go to a resumable
JSON-lines `TrialLog`.
"""

from recbole_darec.search.bo import (
    SearchResult,
    all_binary,
    best_trial,
    fit_gp,
    make_acqf,
    optimize_acqf_exhaustive,
    optimize_acqf_probabilistic_reparam,
    plot_search,
    propose_bo,
    run_search,
    trial_seed,
)
from recbole_darec.search.trial_log import Trial, TrialLog, arch_to_str, str_to_arch

__all__ = [
    "SearchResult",
    "Trial",
    "TrialLog",
    "all_binary",
    "arch_to_str",
    "best_trial",
    "fit_gp",
    "make_acqf",
    "optimize_acqf_exhaustive",
    "optimize_acqf_probabilistic_reparam",
    "plot_search",
    "propose_bo",
    "run_search",
    "str_to_arch",
    "trial_seed",
]
