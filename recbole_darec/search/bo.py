"""Bayesian optimisation over per-layer adapter placements (design doc section 5).

The search space is {0,1}^L (0 = serial adapter, 1 = parallel adapter in layer l). The objective is a noisy
black box (one supernet validation pass per architecture, higher is better). A `SingleTaskGP` is fitted on the
binary vectors and `qLogNoisyExpectedImprovement` is maximised over the binary cube either by probabilistic
reparameterisation (Daulton et al., NeurIPS 2022; our own implementation, botorch 0.18 has none) or, for small
L, by enumerating all 2^L vectors.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from botorch.acquisition import AcquisitionFunction
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.exceptions.errors import InputDataError, ModelFittingError
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim import optimize_acqf_discrete
from botorch.sampling import SobolQMCNormalSampler
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch import Tensor
from tqdm.auto import tqdm

from recbole_darec.model.adapters import arch_to_str, str_to_arch
from recbole_darec.search.trial_log import Trial, TrialLog
from recbole_darec.utils import one_torch_thread

logger = logging.getLogger(__name__)

MAX_EXHAUSTIVE_DIM = 12
METHODS = ("bo", "random")
ACQ_OPTIMIZERS = ("reparam", "exhaustive")


@dataclass
class SearchResult:
    best_arch: str
    best_value: float
    trials: list[Trial]


def all_binary(dim: int, dtype: torch.dtype = torch.double) -> Tensor:
    """All 2^dim binary vectors as a (2^dim, dim) tensor; column j is bit j of the row number."""
    codes = torch.arange(2**dim).unsqueeze(-1)
    return ((codes >> torch.arange(dim)) & 1).to(dtype)


@one_torch_thread()
def fit_gp(train_X: Tensor, train_Y: Tensor) -> SingleTaskGP:
    """Fit a GP on binary architecture vectors (inputs already in the unit cube, so no input transform)."""
    model = SingleTaskGP(train_X.double(), train_Y.double(), outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def make_acqf(
    model: SingleTaskGP, X_baseline: Tensor, mc_samples: int = 128, seed: int = 0
) -> AcquisitionFunction:
    """qLogNEI with a seeded QMC sampler, so its value at a point is a deterministic function of the data."""
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([mc_samples]), seed=seed)
    return qLogNoisyExpectedImprovement(model=model, X_baseline=X_baseline.double(), sampler=sampler)


def _rows_to_keys(Z: Tensor) -> list[bytes]:
    return [row.tobytes() for row in Z.to(torch.uint8).numpy()]


@torch.no_grad()
def _eval_acqf(acqf: AcquisitionFunction, Z: Tensor, batch_size: int) -> Tensor:
    # q = 1 candidates: the acquisition wants (batch, q, d).
    X = Z.double().unsqueeze(-2)
    return torch.cat([acqf(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])


@one_torch_thread()
def optimize_acqf_probabilistic_reparam(
    acqf: AcquisitionFunction,
    dim: int,
    *,
    exclude: Tensor | None = None,
    num_restarts: int = 8,
    num_steps: int = 60,
    num_samples: int = 64,
    lr: float = 0.2,
    max_logit: float = 6.0,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Maximise a q=1 acquisition over {0,1}^dim by probabilistic reparameterisation.

    Each bit z_j ~ Bernoulli(theta_j) with theta = sigmoid(logits); we ascend E_theta[acq(z)] with the
    score-function (REINFORCE) estimator, grad_logits = E[(acq(z) - b) (z - theta)], using a leave-one-out
    mean as baseline b, Adam steps and `num_restarts` independent distributions in parallel. The answer is
    the best discrete z sampled along the way (by exact acquisition value), not the mode of theta, so the
    relaxation never has to be rounded.

    Points in `exclude` (already evaluated) are never returned; inside the expectation they score as the
    lowest acquisition value seen so far, which pushes the distributions off them. All randomness comes from
    `generator` (default: seeded with 0), so the result is deterministic for a deterministic `acqf`.

    Returns (z, acq_value): a (dim,) double tensor of 0/1 and the acquisition value at z.
    """
    if num_samples < 2:
        raise ValueError("num_samples must be >= 2 for the leave-one-out baseline")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    excluded = set(_rows_to_keys(exclude.reshape(-1, dim))) if exclude is not None else set()
    if len(excluded) >= 2**dim:
        raise ValueError("every architecture is excluded; nothing left to propose")

    # The acquisition is deterministic, so every distinct z is evaluated once; as theta concentrates most
    # samples repeat and the cache makes later steps nearly free.
    cache: dict[bytes, float] = {}
    lowest = math.inf  # lowest finite acquisition value seen: the score of excluded and non-finite points

    def score(Z: Tensor) -> Tensor:
        nonlocal lowest
        uniq, inverse = torch.unique(Z, dim=0, return_inverse=True)
        keys = _rows_to_keys(uniq)
        new = [i for i, k in enumerate(keys) if k not in cache and k not in excluded]
        if new:
            values = _eval_acqf(acqf, uniq[new], batch_size).tolist()
            cache.update((keys[i], v) for i, v in zip(new, values))
            lowest = min([lowest, *(v for v in values if math.isfinite(v))])
        floor = lowest if math.isfinite(lowest) else 0.0
        per_row = torch.tensor([cache.get(k, floor) for k in keys], dtype=torch.double)
        return per_row.nan_to_num(floor, posinf=floor, neginf=floor)[inverse]

    # One restart starts from the uniform distribution, the others from random tilts.
    logits = torch.randn(num_restarts, dim, generator=generator, dtype=torch.double)
    logits[0] = 0.0
    # Adam moments, kept by hand: the gradient is analytic, so autograd and torch.optim would add nothing.
    m, v = torch.zeros_like(logits), torch.zeros_like(logits)
    beta1, beta2 = 0.9, 0.999
    for step in range(1, num_steps + 1):
        theta = torch.sigmoid(logits)
        u = torch.rand(num_restarts, num_samples, dim, generator=generator, dtype=torch.double)
        Z = (u < theta.unsqueeze(1)).to(torch.double)
        f = score(Z.reshape(-1, dim)).reshape(num_restarts, num_samples)
        baseline = (f.sum(1, keepdim=True) - f) / (num_samples - 1)
        advantage = f - baseline
        # Adam is invariant to a per-step scale, but not to the scale varying across restarts.
        advantage = advantage / advantage.std(1, keepdim=True).clamp_min(1e-12)
        grad = (advantage.unsqueeze(-1) * (Z - theta.unsqueeze(1))).mean(1)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        ascent = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + 1e-8)
        # Bounded logits keep every bit slightly random, so a converged restart still explores its neighbours.
        logits = (logits + lr * ascent).clamp(-max_logit, max_logit)
    # The modes of the final distributions are natural candidates even if never sampled.
    score((logits > 0).to(torch.double))

    if not cache:
        # Every sample landed on an excluded point; fall back to a random unexcluded one.
        while True:
            z = torch.randint(0, 2, (1, dim), generator=generator, dtype=torch.double)
            if _rows_to_keys(z)[0] not in excluded:
                return z[0], _eval_acqf(acqf, z, batch_size)[0]
    best_key = max(cache, key=lambda k: cache[k] if math.isfinite(cache[k]) else -math.inf)
    z = torch.tensor(np.frombuffer(best_key, dtype=np.uint8).astype(np.float64))
    return z, torch.tensor(cache[best_key], dtype=torch.double)


@one_torch_thread()
def optimize_acqf_exhaustive(
    acqf: AcquisitionFunction, dim: int, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact argmax of a q=1 acquisition over all 2^dim binary vectors (cross-check for small dim).

    Returns (z, acq_value) like `optimize_acqf_probabilistic_reparam`.
    """
    if dim > MAX_EXHAUSTIVE_DIM:
        raise ValueError(
            f"exhaustive search over 2^{dim} architectures refused; it is for dim <= {MAX_EXHAUSTIVE_DIM}"
        )
    X_avoid = exclude.reshape(-1, dim).double() if exclude is not None and exclude.numel() else None
    try:
        cand, value = optimize_acqf_discrete(acqf, q=1, choices=all_binary(dim), X_avoid=X_avoid)
    except InputDataError as err:
        raise ValueError("every architecture is excluded; nothing left to propose") from err
    return cand.reshape(dim), value.reshape(())


def trial_seed(seed: int, index: int) -> int:
    """Seed for trial `index`; it depends only on (seed, index), so a resumed search repeats an uninterrupted
    one."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _random_unseen(dim: int, seen: set[str], generator: torch.Generator) -> str:
    if dim <= MAX_EXHAUSTIVE_DIM:
        pool = [a for a in map(arch_to_str, all_binary(dim, torch.int64).tolist()) if a not in seen]
        return pool[int(torch.randint(len(pool), (1,), generator=generator))]
    # The space dwarfs any affordable budget, so rejection is cheap.
    while True:
        arch = arch_to_str(torch.randint(0, 2, (dim,), generator=generator).tolist())
        if arch not in seen:
            return arch


def propose_bo(
    trials: Sequence[Trial], dim: int, seed: int, acq_optimizer: str = "reparam", mc_samples: int = 128
) -> tuple[str, float]:
    """Next architecture by BO given the history, never an evaluated one; returns (arch, acq value)."""
    finite = [t for t in trials if math.isfinite(t.value)]
    X = torch.tensor([str_to_arch(t.arch) for t in finite], dtype=torch.double)
    Y = torch.tensor([[t.value] for t in finite], dtype=torch.double)
    exclude = torch.tensor([str_to_arch(t.arch) for t in trials], dtype=torch.double)
    # GP fitting and baseline pruning draw from the global RNG; pin it without disturbing the caller's.
    with torch.random.fork_rng(), one_torch_thread():
        torch.manual_seed(seed)
        acqf = make_acqf(fit_gp(X, Y), X, mc_samples=mc_samples, seed=seed)
        if acq_optimizer == "reparam":
            z, value = optimize_acqf_probabilistic_reparam(
                acqf, dim, exclude=exclude, generator=torch.Generator().manual_seed(seed)
            )
        elif acq_optimizer == "exhaustive":
            z, value = optimize_acqf_exhaustive(acqf, dim, exclude=exclude)
        else:
            raise ValueError(f"unknown acq_optimizer {acq_optimizer!r}; expected one of {ACQ_OPTIMIZERS}")
    return arch_to_str(z.round().long().tolist()), float(value)


def best_trial(trials: Sequence[Trial]) -> Trial | None:
    """The first trial with the highest finite value, or None."""
    best = None
    for t in trials:
        if math.isfinite(t.value) and (best is None or t.value > best.value):
            best = t
    return best


def _check_replayed(
    trials: list[Trial], n_layers: int, seed: int, method: str, n_init: int, path: Path
) -> None:
    # Only a layer-count mismatch makes the log unusable; other differences are worth a warning.
    for pos, t in enumerate(trials):
        if len(t.arch) != n_layers:
            raise ValueError(
                f"{path}: trial {t.index} has {len(t.arch)} layers ({t.arch}), the search has {n_layers}"
            )
        if t.index != pos:
            logger.warning("%s: record %d has trial index %d; renumbered in file order", path, pos, t.index)
        if t.extra.get("seed", seed) != seed:
            logger.warning("%s: trial %d used seed %s, resuming with %d", path, pos, t.extra["seed"], seed)
        expected = "random" if method == "random" or pos < n_init else "bo"
        if t.method not in (expected, "random"):
            logger.warning("%s: trial %d came from %r, this search uses %r", path, pos, t.method, expected)


def run_search(
    objective: Callable[[list[int]], float],
    n_layers: int,
    n_init: int,
    n_iter: int,
    method: str = "bo",
    seed: int = 0,
    log_path: str | Path | None = None,
    progress: bool = True,
    acq_optimizer: str = "reparam",
    mc_samples: int = 128,
) -> SearchResult:
    """Search {0,1}^n_layers for the architecture maximising `objective` (higher is better).

    `objective` gets the 0/1 vector (0 = serial, 1 = parallel per layer). `n_init` random trials come
    first, then `n_iter` BO trials (`method="random"`: all `n_init + n_iter` random). An evaluated
    architecture is never proposed again; the search stops early if the space is exhausted. A non-finite
    value is logged but left out of the GP and of the best.

    With `log_path`, every trial is appended to the JSON-lines log as it finishes, and an existing log is
    replayed (not re-evaluated) and the search continues after its last trial. Each trial's randomness is
    seeded from (seed, trial index), so a resumed search proposes exactly what an uninterrupted one would.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if acq_optimizer not in ACQ_OPTIMIZERS:
        raise ValueError(f"unknown acq_optimizer {acq_optimizer!r}; expected one of {ACQ_OPTIMIZERS}")
    if n_layers < 1 or n_init < 0 or n_iter < 0 or n_init + n_iter < 1:
        raise ValueError(f"need n_layers >= 1 and a positive budget, got {n_layers=}, {n_init=}, {n_iter=}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")

    log = TrialLog(log_path) if log_path is not None else None
    trials = log.read() if log is not None else []
    if log is not None and trials:
        _check_replayed(trials, n_layers, seed, method, n_init, log.path)
        logger.info("%s: resuming after %d logged trials", log.path, len(trials))
    trials = [Trial(pos, t.arch, t.value, t.seconds, t.method, t.extra) for pos, t in enumerate(trials)]
    seen = {t.arch for t in trials}
    total = n_init + n_iter

    def postfix(bar: tqdm) -> None:
        best = best_trial(trials)
        if best is not None:
            bar.set_postfix(best=f"{best.value:.4g}", arch=best.arch)

    with tqdm(total=total, initial=min(len(trials), total), disable=not progress, desc=f"{method} search",
              unit="trial") as bar:
        postfix(bar)
        for index in range(len(trials), total):
            if len(seen) >= 2**n_layers:
                logger.info("all %d architectures evaluated; stopping after %d trials", 2**n_layers, index)
                break
            ts = trial_seed(seed, index)
            extra: dict[str, float | int] = {"seed": seed}
            start = time.perf_counter()
            n_finite = sum(math.isfinite(t.value) for t in trials)
            arch = None
            if method == "bo" and index >= n_init and n_finite >= 2:
                try:
                    arch, acq_value = propose_bo(trials, n_layers, ts, acq_optimizer, mc_samples)
                    trial_method = "bo"
                    extra["acq_value"] = acq_value
                except ModelFittingError as err:
                    # One bad fit should not end a search that may have run for hours; this trial explores.
                    logger.warning("trial %d: GP fit failed (%s); proposing at random", index, err)
            if arch is None:
                arch = _random_unseen(n_layers, seen, torch.Generator().manual_seed(ts))
                trial_method = "random"
            extra["propose_seconds"] = time.perf_counter() - start

            start = time.perf_counter()
            value = float(objective(str_to_arch(arch)))
            trial = Trial(index, arch, value, time.perf_counter() - start, trial_method, extra)
            if log is not None:
                log.append(trial)
            trials.append(trial)
            seen.add(arch)
            bar.update(1)
            postfix(bar)

    best = best_trial(trials)
    if best is None:
        return SearchResult(best_arch="", best_value=math.nan, trials=trials)
    return SearchResult(best_arch=best.arch, best_value=best.value, trials=trials)

