"""Tests for the dynamic-adaption search core: BO over {0,1}^L, the trial log and resuming."""

import json
import logging
from dataclasses import asdict

import numpy as np
import pytest
import torch

from recbole_darec.search import (
    Trial,
    TrialLog,
    all_binary,
    arch_to_str,
    fit_gp,
    make_acqf,
    optimize_acqf_exhaustive,
    optimize_acqf_probabilistic_reparam,
    plot_search,
    run_search,
    str_to_arch,
)


def make_problem(seed: int, dim: int = 8, noise: float = 0.0):
    """Weighted Hamming similarity to a hidden target plus an adjacent-pair bonus; unique optimum: target."""
    rng = np.random.default_rng(1000 + seed)
    target = rng.integers(0, 2, dim)
    weights = rng.uniform(0.5, 1.5, dim)

    def true_value(z) -> float:
        match = (np.asarray(z) == target).astype(float)
        return float(weights @ match / weights.sum() + 0.1 * (match[:-1] * match[1:]).mean())

    noise_rng = np.random.default_rng(2000 + seed)

    def objective(z) -> float:
        return true_value(z) + noise * float(noise_rng.standard_normal())

    return arch_to_str(target.tolist()), true_value, objective


def qubo(dim: int, seed: int):
    """A random quadratic pseudo-boolean function, batched like a q=1 acquisition: (b, 1, d) -> (b,)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g, dtype=torch.double)
    Q = 0.3 * torch.randn(dim, dim, generator=g, dtype=torch.double)

    def f(X: torch.Tensor) -> torch.Tensor:
        X = X.squeeze(-2)
        return X @ w + ((X @ Q) * X).sum(-1)

    return f


class CountingAcqf:
    """Wraps an acquisition and records every distinct point it is asked about."""

    def __init__(self, f):
        self.f = f
        self.points = set()

    def __call__(self, X):
        self.points.update(map(tuple, X.reshape(-1, X.shape[-1]).tolist()))
        return self.f(X)


def test_arch_string_round_trip_and_bad_letters():
    assert str_to_arch("spps") == [0, 1, 1, 0]
    assert arch_to_str([0, 1, 1, 0]) == "spps"
    assert arch_to_str(torch.tensor([1.0, 0.0])) == "ps"
    for row in all_binary(5, torch.int64).tolist():
        assert str_to_arch(arch_to_str(row)) == row
    with pytest.raises(ValueError, match="'x'"):
        str_to_arch("spx")
    with pytest.raises(ValueError):
        str_to_arch("SP")
    with pytest.raises(ValueError):
        arch_to_str([0, 2])


def test_corrupt_last_line_is_warned_and_skipped(tmp_path, caplog):
    log = TrialLog(tmp_path / "trials.jsonl")
    written = [Trial(i, "sp"[i % 2] * 4, 0.1 * i, 1.5, "random", {"seed": 0}) for i in range(3)]
    for t in written:
        log.append(t)
    with open(log.path, "a") as f:
        f.write('{"index": 3, "arch": "sp')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        assert log.read() == written
    assert any(f"{log.path}:4" in r.getMessage() for r in caplog.records)

    # The next record must not be glued onto the fragment.
    log.append(Trial(3, "pppp", 0.5, 1.0, "bo"))
    assert [t.index for t in log.read()] == [0, 1, 2, 3]


def test_reparam_finds_global_optimum_without_enumerating():
    dim = 16
    space = all_binary(dim)
    for seed in range(3):
        f = CountingAcqf(qubo(dim, seed))
        best = f.f(space.unsqueeze(-2)).max()
        z, value = optimize_acqf_probabilistic_reparam(f, dim, generator=torch.Generator().manual_seed(seed))
        assert value.item() == pytest.approx(best.item(), abs=1e-9)
        assert f.f(z.view(1, 1, dim)).item() == pytest.approx(value.item())
        # It optimised rather than enumerated.
        assert len(f.points) < 0.25 * 2**dim
        # Deterministic given the generator.
        z2, _ = optimize_acqf_probabilistic_reparam(f, dim, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(z, z2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reparam_agrees_with_exhaustive_on_qlognei(seed):
    dim = 6
    _, _, objective = make_problem(seed, dim=dim)
    X = all_binary(dim)[torch.randperm(2**dim, generator=torch.Generator().manual_seed(seed))[:8]]
    Y = torch.tensor([[objective(x)] for x in X.long().tolist()], dtype=torch.double)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        acqf = make_acqf(fit_gp(X, Y), X, seed=seed)
    for exclude in (None, X):
        z_ex, v_ex = optimize_acqf_exhaustive(acqf, dim, exclude=exclude)
        z_pr, v_pr = optimize_acqf_probabilistic_reparam(
            acqf, dim, exclude=exclude, generator=torch.Generator().manual_seed(seed)
        )
        assert v_pr.item() == pytest.approx(v_ex.item(), abs=1e-6)
        with torch.no_grad():
            assert acqf(z_pr.view(1, 1, dim)).item() == pytest.approx(v_ex.item(), abs=1e-6)
        if exclude is not None:
            evaluated = set(map(tuple, X.tolist()))
            assert tuple(z_pr.tolist()) not in evaluated
            assert tuple(z_ex.tolist()) not in evaluated


def test_exhaustive_refuses_large_dim():
    with pytest.raises(ValueError, match="dim <= 12"):
        optimize_acqf_exhaustive(qubo(13, 0), 13)


def test_bo_finds_optimum_and_beats_random(tmp_path):
    n_init, n_iter = 6, 14
    found, bo_best, random_best = 0, [], []
    for seed in range(4):
        target, true_value, objective = make_problem(seed, noise=0.01)
        bo = run_search(objective, 8, n_init, n_iter, method="bo", seed=seed, progress=False)
        _, _, objective = make_problem(seed, noise=0.01)
        rnd = run_search(objective, 8, n_init, n_iter, method="random", seed=seed, progress=False)

        assert [t.method for t in bo.trials] == ["random"] * n_init + ["bo"] * n_iter
        assert len({t.arch for t in bo.trials}) == n_init + n_iter
        assert len({t.arch for t in rnd.trials}) == n_init + n_iter
        # Same seed, same initial design: the comparison isolates the BO phase.
        assert [t.arch for t in bo.trials[:n_init]] == [t.arch for t in rnd.trials[:n_init]]
        assert bo.best_value == max(t.value for t in bo.trials)

        found += target in {t.arch for t in bo.trials}
        bo_best.append(max(true_value(str_to_arch(t.arch)) for t in bo.trials))
        random_best.append(max(true_value(str_to_arch(t.arch)) for t in rnd.trials))
    assert found >= 3, f"BO found the optimum in only {found} of 4 seeds"
    assert np.mean(bo_best) > np.mean(random_best)

    png = plot_search({"BO": bo.trials, "random": rnd.trials}, tmp_path / "search.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("method", "kill_after"), [("bo", 6), ("random", 3)])
def test_resume_continues_where_killed(tmp_path, method, kill_after):
    dim, n_init, n_iter, seed = 6, 4, 4, 7
    _, true_value, _ = make_problem(seed, dim=dim)

    def key(trials):
        return [(t.index, t.arch, t.value, t.method) for t in trials]

    reference = run_search(true_value, dim, n_init, n_iter, method=method, seed=seed, progress=False)

    log_path = tmp_path / "trials.jsonl"
    first_calls = []

    def killed(z):
        if len(first_calls) == kill_after:
            raise KeyboardInterrupt
        first_calls.append(arch_to_str(z))
        return true_value(z)

    with pytest.raises(KeyboardInterrupt):
        run_search(killed, dim, n_init, n_iter, method=method, seed=seed, log_path=log_path, progress=False)
    assert len(TrialLog(log_path).read()) == kill_after

    resumed_calls = []

    def recording(z):
        resumed_calls.append(arch_to_str(z))
        return true_value(z)

    resumed = run_search(recording, dim, n_init, n_iter, method=method, seed=seed, log_path=log_path,
                         progress=False)
    assert resumed_calls == [t.arch for t in reference.trials[kill_after:]]
    assert key(resumed.trials) == key(reference.trials)
    assert key(TrialLog(log_path).read()) == key(reference.trials)
    assert resumed.best_arch == reference.best_arch

    # A finished log is replayed without evaluating anything.
    def must_not_run(z):
        raise AssertionError("re-evaluated a logged trial")

    again = run_search(must_not_run, dim, n_init, n_iter, method=method, seed=seed, log_path=log_path,
                       progress=False)
    assert key(again.trials) == key(reference.trials)


def test_resume_after_a_torn_write_reruns_only_that_trial(tmp_path, caplog):
    dim, seed = 5, 3
    _, true_value, _ = make_problem(seed, dim=dim)
    reference = run_search(true_value, dim, 3, 3, method="random", seed=seed, progress=False)
    log = TrialLog(tmp_path / "trials.jsonl")
    for t in reference.trials[:2]:
        log.append(t)
    with open(log.path, "a") as f:
        f.write(json.dumps(asdict(reference.trials[2]))[:20])

    calls = []

    def recording(z):
        calls.append(arch_to_str(z))
        return true_value(z)

    with caplog.at_level(logging.WARNING):
        resumed = run_search(recording, dim, 3, 3, method="random", seed=seed, log_path=log.path,
                             progress=False)
    assert any(f"{log.path}:3" in r.getMessage() for r in caplog.records)
    assert calls == [t.arch for t in reference.trials[2:]]
    assert [t.arch for t in resumed.trials] == [t.arch for t in reference.trials]
    assert [t.arch for t in log.read()] == [t.arch for t in reference.trials]


def test_never_repeats_and_stops_when_space_is_exhausted():
    result = run_search(lambda z: float(sum(z)), 3, 5, 5, method="random", seed=0, progress=False)
    every_arch = [arch_to_str(r) for r in all_binary(3, torch.int64).tolist()]
    assert sorted(t.arch for t in result.trials) == sorted(every_arch)
    assert result.best_arch == "ppp" and result.best_value == 3.0


def test_log_from_another_search_space_is_rejected(tmp_path):
    log = TrialLog(tmp_path / "trials.jsonl")
    log.append(Trial(0, "spsp", 0.3, 1.0, "random"))
    with pytest.raises(ValueError, match="layers"):
        run_search(lambda z: 0.0, 5, 2, 2, log_path=log.path, progress=False)
