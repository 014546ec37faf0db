"""Before anything trains: which runs a notebook still needs, a measured estimate of how long they take
on this device, and a limit (``MAX_MINUTES``) past which the notebook refuses to start.

    plan = nb.plan(MAX_MINUTES)          # or Plan(max_minutes)
    with plan:                           # nothing trains inside this block
        for seed in seeds:
            run(seed)                    # the notebook's own run functions, unchanged
    # leaving the block prints the plan and raises BudgetExceeded when the ETA is over the limit

Inside the block, :func:`common.train.cached_train` and :func:`common.train.cached_train_many` build
each run's key as usual and look it up (local cache, then the committed ``results/``) without
training. A stored run is returned as it is; a missing one is recorded and a *placeholder* result is
returned (``history`` and ``states`` None, ``source == "pending"``, its ``hash`` that of its key), so a
run keyed on it (a transfer variant of a missing upstream run) is recorded as missing too.

On leaving the block the missing runs are grouped by what their cost depends on (model builder and
its arguments except seeds and init scales, data shape, batch size, dtype, evaluation-set shapes,
probes, stack size, step count and schedules), and each group is timed here with the real training
functions on fresh networks: one untimed warm-up call, then ``w`` and ``w + k`` training steps
(per-step time and per-run set-up), ``w`` steps evaluating the evaluation sets twice (time of one
evaluation of them all) and ``w`` steps calling each probe twice (time of one call). A run's estimate is

    set-up + steps * step + evaluations * evaluation + sum over probes of calls * call

with the counts of evaluations and probe calls taken from the run's own schedule (the rule
:func:`common.train.train` follows). Stacked groups are timed with ``min(stack, missing)`` members
and charged once per chunk. Saving a run to the cache is not counted.

Each timed stretch lasts at least ``min_s`` seconds (default 0.3): ``k`` starts at ``timed`` and grows,
and so do the evaluations and probe calls (one at each of as many steps, at most ``w + k``), until the
stretch takes that long or is as long as the run itself. On a GPU ten steps of a small network take a
few tens of milliseconds, of the order of the copy of the training set to the device that each timing
call makes, so two calls ten steps apart could differ by little more than that copy's variation.

A run read from ``results/`` has no weights. When a missing run starts from one (a transfer variant of an
upstream run stored there), the upstream run is trained again for its weights before it: the plan counts
that retraining as one more run to train (``retrained``).

A notebook that pools many like members (networks, seeds) plans with :meth:`Plan.fit` instead of the block:

    n = nb.plan(MAX_MINUTES).fit(all_runs, cfg["n_runs"], minimum=2)   # all_runs(n): the runs of n members
    results = all_runs(n)

Its runs are collected for each count ``minimum, ..., n_max`` (a run belongs to the first count that asks for it)
and measured once; ``fit`` returns the largest count whose missing runs fit ``MAX_MINUTES`` and refuses only when
``minimum`` does not fit. Stored members cost nothing, so an execution after a window that trained some pools more;
the full count is reached with ``MAX_MINUTES = None`` or by successive executions.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from . import cache

#: The plan collecting runs right now (set inside ``with plan:``), else None.
ACTIVE: Optional[Plan] = None

#: Model-builder arguments that do not change a run's cost (left out of its group).
_FREE_SPEC_ARGS = {"seed", "init_scale", "first_layer_std"}
#: ``train`` arguments that do not change a run's cost (left out of its group).
_FREE_TRAIN_ARGS = {"lr", "momentum", "weight_decay", "nesterov", "schedule", "milestones", "gamma", "data_seed"}


class BudgetExceeded(RuntimeError):
    """The measured ETA of the runs still to train is over the notebook's ``MAX_MINUTES``; nothing was trained."""


def planning() -> bool:
    """Whether a :class:`Plan` is collecting runs (so nothing may train)."""
    return ACTIVE is not None


def n_records(steps: int, every=None, at=()) -> int:
    """How many times :func:`common.train.train` records something with schedule ``every`` (a period, a
    list of steps or None) and extra steps ``at`` over a run of ``steps`` steps (the rule it follows,
    :func:`common.train._recorded_at`: step 0, the end, and every due step in between)."""
    from .train import _recorded_at

    at = set(at)
    return sum(_recorded_at(s, steps, every, at) for s in range(steps + 1))


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _upstream_hash(init) -> Optional[str]:
    """The cache hash of the run an init's key names as its upstream (`common.transfer.Variant.key`), else None."""
    return init.get("upstream") if isinstance(init, dict) else None


class _Pending:
    """One missing run: how to build it and train it for a few steps, and the group it is costed with."""

    def __init__(self, model, x, y, probes, eval_sets, train_kwargs, stack, dev, member=None):
        from .train import n_steps, train_arguments

        self.model, self.x, self.y, self.probes, self.dev = model, x, y, list(probes), dev
        self.member = member  # the pooled count that first asked for this run (Plan.fit), else None
        self.retrain = False  # stored in results/ without weights, trained again for a missing run that starts from it
        self.eval_sets = eval_sets or {}
        self.stack = max(1, int(stack))
        args = train_arguments(train_kwargs)  # every keyed argument of train, defaults filled in
        self.steps = n_steps(args["steps"], args["epochs"], len(y), args["batch_size"])
        self.eval_every, self.eval_at = args["eval_every"], tuple(args["eval_at"])
        schedule_args = {"steps", "epochs", "eval_every", "eval_at", "data_seed"}
        # what the timing calls pass to train besides their own steps, evaluation sets and callbacks
        self.kw = {k: v for k, v in train_kwargs.items() if k not in schedule_args}
        spec = {k: v for k, v in model.key().items() if k not in _FREE_SPEC_ARGS}
        hyper = {k: v for k, v in args.items() if k not in _FREE_TRAIN_ARGS | schedule_args}
        self.group = cache.canonical(
            dict(
                spec=spec,
                x=list(x.shape),
                evals={k: list(v[0].shape) for k, v in self.eval_sets.items()},
                probes=[p.key() for p in self.probes],
                train=hyper,
                steps=self.steps,
                eval_every=self.eval_every,
                eval_at=sorted(self.eval_at),
                stack=self.stack,
            )
        )

    def describe(self) -> str:
        spec = dict(self.group["spec"])
        builder = spec.pop("builder", "?")
        args = ", ".join(f"{k}={v}" for k, v in spec.items())
        evals = ", ".join(f"{k} {v[0]}" for k, v in self.group["evals"].items())
        return (
            f"{builder}({args}) on {self.group['x'][0]} inputs, {self.steps} steps of "
            f"{self.kw.get('batch_size', 256)}"
            + (f", eval {evals} x{n_records(self.steps, self.eval_every, self.eval_at)}" if evals else "")
            + (f", {len(self.probes)} probe(s)" if self.probes else "")
            + (f", stacked by {self.stack}" if self.stack > 1 else "")
        )

    def _timed(self, members, steps, evals, callbacks, eval_at=()) -> float:
        from .stacked import train_stacked
        from .train import train

        kw = dict(self.kw, steps=steps, eval_sets=evals, eval_at=eval_at, callbacks=callbacks, dev=self.dev)
        nets = [m.model.build() for m in members]
        _sync(self.dev)
        t0 = time.perf_counter()
        if self.stack == 1:
            train(nets[0], self.x, self.y, data_seed=0, desc="plan", **kw)
        else:
            kw.pop("augment", None)
            train_stacked(nets, self.x, [m.y for m in members], data_seeds=list(range(len(nets))), **kw)
        _sync(self.dev)
        return time.perf_counter() - t0

    def measure(self, members, warm: int, timed: int, min_s: float) -> dict:
        """Seconds for one run (one chunk when stacked) of this group, with the parts it is made of (module
        docstring): ``setup_s``, ``step_s``, ``eval_s``, ``probe_s`` (one per probe), ``run_s``, and how many
        steps, evaluations and probe calls were timed (``timed``)."""
        w = max(1, min(warm, self.steps))
        evals = self.eval_sets or None
        self._timed(members, w, evals, [([], p) for p in self.probes])  # warm-up: kernels, allocator, cuDNN
        a = self._timed(members, w, None, [])
        k, step = _stretch(lambda k: self._timed(members, w + k, None, []) - a, timed, self.steps - w, min_s)
        setup = max(a - w * step, 0.0)

        # seconds of n evaluations (or probe calls): a run with them, less the same run without them
        def records(n, evals=None, probe=None):
            s = max(w, n - 1)  # recorded at step 0, at steps 1 .. n - 2 and at the end
            at = list(range(1, n - 1))
            t = self._timed(members, s, evals, [] if probe is None else [(at, probe)], eval_at=at if evals else ())
            return t - (setup + s * step)

        most = w + k + 1  # never more training steps than the step timing took
        n_eval = n_records(self.steps, self.eval_every, self.eval_at) if evals else 0
        n_calls = [n_records(self.steps, p.every) for p in self.probes]
        ev, n_ev = 0.0, 0
        if evals:
            n_ev, ev = _stretch(lambda n: records(n, evals=evals), 2, min(most, max(2, n_eval)), min_s)
        calls = [
            _stretch(lambda n, p=p: records(n, probe=p), 2, min(most, max(2, c)), min_s)
            for p, c in zip(self.probes, n_calls)
        ]
        total = setup + self.steps * step + n_eval * ev + sum(n * c for n, (_, c) in zip(n_calls, calls))
        return {
            "setup_s": setup,
            "step_s": step,
            "eval_s": ev,
            "probe_s": [c for _, c in calls],
            "run_s": total,
            "timed": {"steps": k, "evals": n_ev, "probe_calls": [n for n, _ in calls]},
        }


def _stretch(cost: Callable[[int], float], n: int, most: int, min_s: float) -> tuple:
    """``(n, seconds per unit)`` from ``cost(n)``, the seconds of ``n`` units of work (steps, evaluations): ``n``
    starts at the given count and grows, at most three times and never past ``most``, until they take ``min_s``."""
    most = max(1, most)
    n = max(1, min(n, most))
    t = cost(n)
    for _ in range(3):
        if t >= min_s or n >= most:
            break
        n = min(most, max(2 * n, math.ceil(1.5 * n * min_s / max(t, 1e-4))))
        t = cost(n)
    return n, max(t, 0.0) / n


class Plan:
    """Collects the runs a block of notebook code would train (see the module docstring), measures them
    and enforces ``max_minutes`` (None: no limit). ``warm`` and ``timed``: training steps of the timing
    calls; ``min_s``: the least seconds each timed stretch lasts (module docstring). After the block (or
    :meth:`fit`): ``eta_s`` (estimated seconds for the missing runs it will train), ``measure_s`` (what the
    timing took), ``rows`` (one dict per group), ``missing`` (those runs), ``stored`` (run counts by where
    they were found) and ``pool`` (what :meth:`fit` chose, else None)."""

    def __init__(
        self,
        max_minutes: Optional[float] = None,
        warm: int = 3,
        timed: int = 10,
        min_s: float = 0.3,
        hint: str = "",
        dev=None,
    ):
        self.max_minutes, self.hint, self.dev = max_minutes, hint, dev
        self.warm, self.timed, self.min_s = warm, timed, min_s
        self.pending: list = []  # every missing run collected, in the order asked
        self.missing: list = []  # those to train: all of them, or the first ``pool["used"]`` members'
        self.eta_s = self.measure_s = 0.0
        self.rows: list = []
        self.pool: Optional[dict] = None
        self._seen: dict = {}  # hash -> (where it was found: "cache", "results" or None, its member)
        self._weightless: dict = {}  # hash -> _Pending of a run found in results/ whose weights a variant may need
        self._member: Optional[int] = None
        self._groups: list = []  # (members, cost of one run or chunk, chunk size) per group, from estimate()

    # ------------------------------------------------------------------ collecting (called by common.train)

    def add(self, key: dict, force: bool, model, x, y, probes, eval_sets, train_kwargs, stack=1):
        """The stored run for ``key``, or a placeholder after recording the run as missing."""
        from .train import device

        h = cache.key_hash(key)
        found = None if force else cache.lookup(key)
        if h not in self._seen:
            self._seen[h] = (found.source if found is not None else None, self._member)

            def pending():
                return _Pending(model, x, y, probes, eval_sets, train_kwargs, stack, self.dev or device(), self._member)

            if found is None:
                up = _upstream_hash(key["parts"].get("init"))
                if up in self._weightless:  # trained again first, for its weights
                    again = self._weightless.pop(up)
                    again.member, again.retrain = self._member, True
                    self.pending.append(again)
                self.pending.append(pending())
            elif found.source == "results" and "trained" in key["parts"].get("keep", []):
                self._weightless[h] = pending()
        if found is not None:
            return found
        return cache.CachedResult(key, None, None, ".", "pending")

    # ------------------------------------------------------------------ the block

    def _start(self) -> None:
        global ACTIVE
        if ACTIVE is not None:
            raise RuntimeError("a plan is already collecting runs")
        ACTIVE = self

    def _stop(self) -> None:
        global ACTIVE
        ACTIVE = None
        self._member = None

    def __enter__(self) -> Plan:
        self._start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop()
        if exc_type is None:
            self.estimate()
            print(self.table())
            self.enforce()
        return False

    def fit(self, runs: Callable[[int], object], n_max: int, minimum: int = 1) -> int:
        """Plan a notebook that pools ``n_max`` like members: ``runs(n)`` calls every run function the notebook
        needs when it pools its first ``n`` members (nothing trains while it does). Returns the largest ``n`` in
        ``[minimum, n_max]`` whose missing runs fit ``max_minutes``, and prints the plan for it; raises
        :class:`BudgetExceeded` when even ``minimum`` does not fit."""
        minimum = max(1, min(minimum, n_max))
        self._start()
        try:
            for n in range(minimum, n_max + 1):  # a run belongs to the first count that asks for it
                self._member = n
                runs(n)
        finally:
            self._stop()
        self.estimate()
        limit = math.inf if self.max_minutes is None else 60 * self.max_minutes
        fitting = [n for n in range(minimum, n_max + 1) if self._tally(n)[1] <= limit]
        used = fitting[-1] if fitting else minimum
        eta_all = self._tally(n_max)[1]
        self.rows, self.eta_s, self.missing = self._tally(used)
        self.pool = {"asked": n_max, "used": used, "minimum": minimum, "eta_all_s": round(eta_all, 1)}
        print(self.table())
        self.enforce()
        return used

    def label(self) -> str:
        """How many members are pooled, for titles: ``"12 of 70"`` when :meth:`fit` pooled fewer than asked,
        else the count (``""`` without :meth:`fit`)."""
        if self.pool is None:
            return ""
        used, asked = self.pool["used"], self.pool["asked"]
        return f"{used} of {asked}" if used < asked else f"{used}"

    # ------------------------------------------------------------------ estimating

    def estimate(self) -> float:
        """Time every group of missing runs (module docstring) and return the ETA in seconds of all of them."""
        t0 = time.perf_counter()
        groups: dict = {}
        for p in self.pending:
            groups.setdefault(cache.key_hash(p.group), []).append(p)
        self._groups = []
        for members in groups.values():
            chunk = min(members[0].stack, len(members))
            self._groups.append(
                (members, members[0].measure(members[:chunk], self.warm, self.timed, self.min_s), chunk)
            )
        self.measure_s = time.perf_counter() - t0
        self.rows, self.eta_s, self.missing = self._tally(None)
        return self.eta_s

    def _tally(self, n: Optional[int]) -> tuple:
        """``(rows, eta_s, missing)`` for the missing runs of the first ``n`` pooled members (None: all)."""
        rows, eta, missing = [], 0.0, []
        for members, cost, chunk in self._groups:
            todo = [p for p in members if n is None or p.member is None or p.member <= n]
            if not todo:
                continue
            n_chunks = math.ceil(len(todo) / chunk)
            first = members[0]
            rows.append(
                {
                    "what": first.describe(),
                    "runs": len(todo),
                    "chunks": n_chunks,
                    "steps": first.steps,
                    **cost,
                    "total_s": n_chunks * cost["run_s"],
                }
            )
            eta += n_chunks * cost["run_s"]
            missing += todo
        return rows, eta, missing

    @property
    def stored(self) -> dict:
        """How many of the runs asked for (those of the pooled members after :meth:`fit`) were found stored, by
        where: ``{"cache": n, "results": m}``."""
        n = None if self.pool is None else self.pool["used"]
        out = {"cache": 0, "results": 0}
        for source, member in self._seen.values():
            if source is not None and (n is None or member is None or member <= n):
                out[source] += 1
        return out

    @property
    def retrained(self) -> int:
        """How many of the runs to train are stored in ``results/`` and trained again for their weights."""
        return sum(p.retrain for p in self.missing)

    def table(self) -> str:
        dev = self.dev
        if dev is None:
            from .train import device

            dev = device()
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU"
        n_stored, n_again = sum(self.stored.values()), self.retrained
        lines = [
            f"plan: {len(self.missing) - n_again + n_stored} runs; {n_stored} stored ({self.stored['cache']} in the "
            f"local cache, {self.stored['results']} in results/), {len(self.missing)} to train on {name}"
            + (
                f" ({n_again} of them stored in results/, again for the weights a missing run starts from)"
                if n_again
                else ""
            )
        ]
        if self.rows:
            lines.append("| runs | each (s) | of which training steps | group |")
            lines.append("|---:|---:|---:|---|")
            for r in self.rows:
                share = r["chunks"] / r["runs"]  # a stacked chunk's time is shared by its members
                each, steps = r["run_s"] * share, r["step_s"] * r["steps"] * share
                lines.append(f"| {r['runs']} | {each:.1f} | {steps:.1f} | {r['what']} |")
        limit = "no limit" if self.max_minutes is None else f"MAX_MINUTES = {self.max_minutes:g}"
        lines.append(f"ETA {self.eta_s / 60:.1f} min (measured in {self.measure_s:.1f} s; {limit})")
        if self.pool is not None:
            p = self.pool
            if self.max_minutes is not None and self.eta_s > 60 * self.max_minutes:
                lines.append(f"even the least count this notebook pools ({p['minimum']} of {p['asked']}) does not fit")
            elif p["used"] < p["asked"]:
                lines.append(
                    f"pooling {p['used']} of {p['asked']}: the largest count whose missing runs fit {limit} (all "
                    f"{p['asked']}: ETA {p['eta_all_s'] / 60:.1f} min). The runs trained now are kept, so the next "
                    f"execution pools more; MAX_MINUTES = None trains all {p['asked']}."
                )
            else:
                lines.append(f"pooling all {p['asked']}")
        return "\n".join(lines)

    def enforce(self) -> None:
        """Raise :class:`BudgetExceeded` when the ETA is over ``max_minutes``."""
        if self.max_minutes is not None and self.eta_s > 60 * self.max_minutes:
            least = "" if self.pool is None else f" (the least this notebook pools: {self.pool['minimum']})"
            raise BudgetExceeded(
                f"the runs still to train{least} need about {self.eta_s / 60:.1f} min here, over MAX_MINUTES = "
                f"{self.max_minutes:g}; nothing was trained. Raise MAX_MINUTES (None: no limit), take a smaller "
                f"preset" + (f", or lower {self.hint}" if self.hint else "") + "."
            )

    def summary(self) -> dict:
        """What goes into the claims JSON."""
        return {
            "to_train": len(self.missing),
            "retrained": self.retrained,
            "stored": self.stored,
            "eta_s": round(self.eta_s, 1),
            "measure_s": round(self.measure_s, 1),
            "max_minutes": self.max_minutes,
            "pooled": self.pool,
        }
