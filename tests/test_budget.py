"""The plan that runs before a notebook trains: it trains nothing, finds stored runs (local cache and
results/), counts records as the training loop makes them, estimates within a factor of the real
wall time, and refuses past MAX_MINUTES."""

import time

import pytest
import torch

import common as C
from common import budget, cache
from common.data import fake_cifar10, standardized


@pytest.fixture(scope="module")
def small():
    d = fake_cifar10(512, seed=0)
    x, _ = standardized(d)
    return x, d.y_train


def _run(x, y, seed=0, steps=40, **kw):
    probes = [C.FirstLayerMisalignment({"r": C.random_orthonormal_basis(27, 0)}, every=7)]
    return C.cached_train(
        C.spec("two_layer_cnn", filters=32, hidden=16, seed=seed),
        x,
        y,
        probes=probes,
        eval_sets={"train": (x[:256], y[:256])},
        steps=steps,
        batch_size=64,
        eval_every=10,
        eval_at=[3],
        data_seed=seed,
        **kw,
    )


def test_inside_a_plan_nothing_trains_and_missing_runs_are_counted(small):
    x, y = small
    n0 = len(cache.LEDGER)
    with C.Plan(None) as plan:
        got = [_run(x, y, s) for s in (0, 1)]
        again = _run(x, y, 0)  # the same run asked twice is one run to train
    assert not budget.planning()
    assert [r.source for r in got] == ["pending", "pending"] and again.history is None
    assert len(plan.pending) == 2 and len(plan.rows) == 1 and plan.rows[0]["runs"] == 2
    assert plan.eta_s > 0
    assert not cache.cache_dir().exists() or not any(cache.cache_dir().iterdir())
    assert len(cache.LEDGER) == n0
    # a transfer variant of a missing upstream run is missing too (its key names the placeholder)
    with C.Plan(None) as plan:
        up = _run(x, y, 0)
        v = C.Variant("covariance", up, 0)
        down = C.cached_train(
            C.spec("two_layer_cnn", filters=32, hidden=16, seed=9), x, y, init=v, steps=5, batch_size=64
        )
    assert down.source == "pending" and len(plan.pending) == 2


def test_stored_runs_come_back_and_cost_nothing_even_from_results(small, tmp_path, monkeypatch):
    x, y = small
    trained = _run(x, y, 0, export="figtest")  # local cache + results/figtest
    with C.Plan(max_minutes=0) as plan:  # a zero budget refuses anything that must train
        r = _run(x, y, 0)
    assert r.source == "cache" and r.history == trained.history and plan.eta_s == 0
    assert plan.stored == {"cache": 1, "results": 0}
    # a laptop without the local cache: the committed record is found, nothing is refused
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "empty"))
    with C.Plan(max_minutes=0) as plan:
        r = _run(x, y, 0)
    assert r.source == "results" and r.history["eval"] == trained.history["eval"]
    assert plan.stored == {"cache": 0, "results": 1} and not plan.pending


@pytest.mark.parametrize("stack", [1, 2])
def test_a_run_that_starts_from_a_weightless_stored_run_counts_its_retraining(small, tmp_path, monkeypatch, stack):
    """A GPU window stored an upstream run in results/ (no weights); the next window's plan, missing two transfer
    variants of it (trained one by one, or stacked), counts the upstream run's retraining once, and that is what then
    happens."""
    x, y = small
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))

    def up():
        return _run(x, y, 0, keep=["init", "trained"], export="figtest")

    def down(u):
        models = [C.spec("two_layer_cnn", filters=32, hidden=16, seed=9 + s) for s in (0, 1)]
        inits = [C.Variant("covariance", u, s) for s in (0, 1)]
        kw = dict(data_seeds=[0, 1], inits=inits, stack=stack, steps=5, batch_size=64, export="figtest")
        return C.cached_train_many(models, x, y, **kw)

    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "window1"))
    up()  # the first window ends after the upstream run
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "window2"))  # a fresh machine: an empty local cache
    with C.Plan(None) as plan:
        u = up()
        down(u)
    assert u.source == "results" and plan.stored == {"cache": 0, "results": 1}
    assert len(plan.missing) == 3 and plan.retrained == 1 and plan.summary()["retrained"] == 1
    assert "plan: 3 runs; 1 stored" in plan.table() and "3 to train on the CPU (1 of them" in plan.table()
    n0 = len(cache.LEDGER)
    down(up())
    computed = [r for r in cache.LEDGER[n0:] if r.source == "computed"]
    assert len(computed) == 3 and computed[0].hash == u.hash  # the upstream run again, then both transfer runs
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "window3"))  # all stored now: nothing to train
    with C.Plan(None) as plan:
        down(up())
    assert not plan.missing and plan.retrained == 0 and plan.stored == {"cache": 0, "results": 3}


def test_refuses_past_max_minutes_before_training(small):
    x, y = small
    with pytest.raises(C.BudgetExceeded, match="nothing was trained. .*lower SEEDS"):
        with C.Plan(max_minutes=1e-6, hint="SEEDS") as plan:
            _run(x, y, 0)
    assert plan.eta_s > 0 and not budget.planning()
    assert not cache.cache_dir().exists() or not [p for p in cache.cache_dir().iterdir() if p.is_dir()]


@pytest.mark.parametrize("steps", [1, 10, 40, 41])
def test_record_counts_follow_the_training_loop(small, steps):
    """Independent reference: the evaluations and probe calls a real run records."""
    x, y = small
    h = _run(x, y, 0, steps=steps).history
    assert budget.n_records(steps, 10, [3]) == len(h["eval"]["step"])
    assert budget.n_records(steps, 7) == len(h["callbacks"]["step"])
    assert budget.n_records(steps, [5, 20]) == len({0, steps} | {s for s in (5, 20) if s < steps})


def test_eta_is_within_a_factor_of_the_real_time(small):
    x, y = small
    torch.manual_seed(0)
    with C.Plan(None, warm=3, timed=10) as plan:
        for s in (0, 1):
            _run(x, y, s, steps=150)
    t0 = time.perf_counter()
    for s in (0, 1):
        _run(x, y, s, steps=150)
    real = time.perf_counter() - t0
    assert real / 2.5 < plan.eta_s < real * 2.5, (plan.eta_s, real)


def _clock(monkeypatch, setup=0.060, jitter=0.015, step=0.002, evaluation=0.020, call=0.001, seed=0):
    """Timing calls on a made-up device: ``setup`` seconds (give or take ``jitter``, uniform) per call, ``step``
    per training step, ``evaluation`` per evaluation of the sets and ``call`` per probe call, counted as the
    training loop records them (:func:`common.budget.n_records`). GPU-like: ten steps take less than the jitter."""
    rng = torch.Generator().manual_seed(seed)

    def timed(self, members, steps, evals, callbacks, eval_at=()):
        t = setup + jitter * (2 * torch.rand((), generator=rng).item() - 1) + steps * step
        t += evaluation * budget.n_records(steps, None, eval_at) if evals else 0.0
        return t + sum(call * budget.n_records(steps, every) for every, _ in callbacks)

    monkeypatch.setattr(budget._Pending, "_timed", timed)


def test_each_timed_stretch_lasts_min_s_so_set_up_jitter_does_not_swamp_fast_steps(small, monkeypatch):
    x, y = small
    with C.Plan(None) as plan:
        _run(x, y, 0, steps=2000)
    pending = plan.pending[0]
    far = {"step": [], "eval": [], "call": []}  # relative errors of the estimates
    for seed in range(20):
        _clock(monkeypatch, seed=seed)
        cost = pending.measure([pending], warm=3, timed=10, min_s=0.3)
        assert cost["timed"]["steps"] * 0.002 >= 0.3 and cost["timed"]["evals"] * 0.020 >= 0.3
        far["step"].append(abs(cost["step_s"] / 0.002 - 1))
        far["eval"].append(abs(cost["eval_s"] / 0.020 - 1))
        far["call"].append(abs(cost["probe_s"][0] / 0.001 - 1))
    assert max(far["step"]) < 0.1 and max(far["eval"]) < 0.1 and max(far["call"]) < 0.3, far
    # without a least duration (ten timed steps, two evaluations, two calls; more only where the difference came out
    # negative) the jitter of one set-up is most of what is measured
    worst = 0.0
    for seed in range(20):
        _clock(monkeypatch, seed=seed)
        cost = pending.measure([pending], warm=3, timed=10, min_s=0.0)
        worst = max(worst, abs(cost["step_s"] / 0.002 - 1))
    assert worst > 0.3


def test_timing_never_runs_longer_than_the_run_itself(small, monkeypatch):
    x, y = small
    with C.Plan(None) as plan:
        _run(x, y, 0, steps=40)
    pending = plan.pending[0]
    _clock(monkeypatch, step=1e-5, evaluation=1e-5, call=1e-5)  # nothing is ever long enough
    cost = pending.measure([pending], warm=3, timed=10, min_s=0.3)
    n_eval = budget.n_records(40, 10, [3])
    assert cost["timed"] == {"steps": 37, "evals": n_eval, "probe_calls": [budget.n_records(40, 7)]}


def test_stacked_groups_are_timed_with_the_stacked_trainer(small):
    x, y = small
    xf = x.flatten(1)[:, :30].contiguous()
    models = [C.spec("two_layer_fc", d_in=30, h1=32, h2=16, seed=s) for s in range(5)]
    with C.Plan(None) as plan:
        runs = C.cached_train_many(models, xf, y, data_seeds=list(range(5)), stack=2, steps=20, batch_size=64)
    assert [r.source for r in runs] == ["pending"] * 5
    assert plan.rows[0]["runs"] == 5 and plan.rows[0]["chunks"] == 3 and "stacked by 2" in plan.rows[0]["what"]
    assert plan.eta_s == pytest.approx(3 * plan.rows[0]["run_s"])


def _fixed_cost(monkeypatch, seconds=10.0):
    """Every run (one chunk when stacked) costs ``seconds``: what fit chooses can then be worked out by hand."""

    def measure(self, members, warm, timed, min_s):
        return {"setup_s": 0.0, "step_s": 0.0, "eval_s": 0.0, "probe_s": [], "run_s": seconds}

    monkeypatch.setattr(budget._Pending, "measure", measure)


def test_fit_pools_the_largest_count_that_fits_and_stored_members_cost_nothing(small, monkeypatch):
    x, y = small
    _fixed_cost(monkeypatch)

    def all_runs(n):  # one shared run (seed 100) and one run per pooled member
        return [_run(x, y, 100, steps=3)] + [_run(x, y, s, steps=3) for s in range(n)]

    # by hand: n members need 10 s (shared) + 10 s * n; 45 s fits n = 3
    plan = C.Plan(max_minutes=0.75)
    assert plan.fit(all_runs, 6, minimum=2) == 3 and plan.label() == "3 of 6"
    assert len(plan.missing) == 4 and len(plan.pending) == 7 and plan.eta_s == pytest.approx(40)
    assert plan.pool == {"asked": 6, "used": 3, "minimum": 2, "eta_all_s": 70.0}
    assert plan.summary()["to_train"] == 4 and not budget.planning()
    assert C.Plan(None).fit(all_runs, 6, minimum=2) == 6
    plan = C.Plan(max_minutes=0.4)
    with pytest.raises(C.BudgetExceeded, match="the least this notebook pools: 2"):
        plan.fit(all_runs, 6, minimum=2)  # 30 s for the least, 2 members
    assert "even the least count this notebook pools (2 of 6) does not fit" in plan.table()
    for s in (100, 0, 1):  # an earlier window trained the shared run and two members
        _run(x, y, s, steps=3)
    plan = C.Plan(max_minutes=0.75)
    assert plan.fit(all_runs, 6, minimum=2) == 6  # members 2..5 cost 40 s
    assert plan.stored == {"cache": 3, "results": 0} and len(plan.missing) == 4 and plan.label() == "6"
    _run(x, y, 5, steps=3)  # a member past the count that fits is not counted as used
    plan = C.Plan(max_minutes=0.25)  # members 2 and 3 cost 10 s each: 15 s fits n = 3
    assert plan.fit(all_runs, 6, minimum=2) == 3 and plan.stored["cache"] == 3 and len(plan.missing) == 1


def test_fit_charges_stacked_members_per_chunk(small, monkeypatch):
    x, y = small
    _fixed_cost(monkeypatch, 20.0)
    xf = x.flatten(1)[:, :30].contiguous()

    def all_runs(n):
        models = [C.spec("two_layer_fc", d_in=30, h1=32, h2=16, seed=s) for s in range(n)]
        return C.cached_train_many(models, xf, y, data_seeds=list(range(n)), stack=2, steps=5, batch_size=64)

    plan = C.Plan(max_minutes=50 / 60)  # by hand: ceil(n / 2) chunks of 20 s; 50 s fits 2 chunks, n = 4
    assert plan.fit(all_runs, 7) == 4 and plan.rows[0]["chunks"] == 2 and plan.eta_s == pytest.approx(40)
