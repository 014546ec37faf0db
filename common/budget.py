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
(per-step time and per-run set-up), ``w`` steps with the evaluation sets (time of one evaluation of
them all) and ``w`` steps with each probe (time of one call). A run's estimate is

    set-up + steps * step + evaluations * evaluation + sum over probes of calls * call

with the counts of evaluations and probe calls taken from the run's own schedule (the rule
:func:`common.train.train` follows). Stacked groups are timed with ``min(stack, missing)`` members
and charged once per chunk. Saving a run to the cache is not counted.
"""

from __future__ import annotations

import math
import time
from typing import Optional

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


class _Pending:
    """One missing run: how to build it and train it for a few steps, and the group it is costed with."""

    def __init__(self, model, x, y, probes, eval_sets, train_kwargs, stack, dev):
        from .train import n_steps, train_arguments

        self.model, self.x, self.y, self.probes, self.dev = model, x, y, list(probes), dev
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

    def _timed(self, members, steps, evals, callbacks) -> float:
        from .stacked import train_stacked
        from .train import train

        kw = {**self.kw, "steps": steps, "eval_sets": evals, "callbacks": callbacks, "dev": self.dev}
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

    def measure(self, members, warm: int, timed: int) -> dict:
        """Seconds for one run (one chunk when stacked) of this group, with the parts it is made of."""
        w = max(1, min(warm, self.steps))
        every = 10**12  # a probe or evaluation then runs only at step 0 and at the end of the timing call
        evals = self.eval_sets or None
        self._timed(members, w, evals, [(every, p) for p in self.probes])  # warm-up: kernels, allocator, cuDNN
        a = self._timed(members, w, None, [])
        b = self._timed(members, w + timed, None, [])
        step = max(b - a, 0.0) / timed
        setup = max(a - w * step, 0.0)
        ev = max(self._timed(members, w, evals, []) - a, 0.0) / 2 if evals else 0.0
        calls = [max(self._timed(members, w, None, [(every, p)]) - a, 0.0) / 2 for p in self.probes]
        n_eval = n_records(self.steps, self.eval_every, self.eval_at) if evals else 0
        n_calls = [n_records(self.steps, p.every) for p in self.probes]
        total = setup + self.steps * step + n_eval * ev + sum(n * c for n, c in zip(n_calls, calls))
        return {"setup_s": setup, "step_s": step, "eval_s": ev, "probe_s": calls, "run_s": total}


class Plan:
    """Collects the runs a block of notebook code would train (see the module docstring), measures them
    and enforces ``max_minutes`` (None: no limit). ``warm`` and ``timed``: training steps of the timing
    calls. After the block: ``eta_s`` (estimated seconds for the missing runs), ``measure_s`` (what the
    timing took), ``rows`` (one dict per group), ``stored`` / ``missing`` (run counts)."""

    def __init__(self, max_minutes: Optional[float] = None, warm: int = 3, timed: int = 10, hint: str = "", dev=None):
        self.max_minutes, self.warm, self.timed, self.hint, self.dev = max_minutes, warm, timed, hint, dev
        self.pending: list = []
        self.stored = {"cache": 0, "results": 0}
        self.eta_s = self.measure_s = 0.0
        self.rows: list = []
        self._seen: set = set()

    # ------------------------------------------------------------------ collecting (called by common.train)

    def add(self, key: dict, force: bool, model, x, y, probes, eval_sets, train_kwargs, stack=1):
        """The stored run for ``key``, or a placeholder after recording the run as missing."""
        h = cache.key_hash(key)
        found = None if force else cache.lookup(key)
        if found is not None:
            if h not in self._seen:
                self.stored[found.source] += 1
            self._seen.add(h)
            return found
        if h not in self._seen:
            from .train import device

            self._seen.add(h)
            self.pending.append(_Pending(model, x, y, probes, eval_sets, train_kwargs, stack, self.dev or device()))
        return cache.CachedResult(key, None, None, ".", "pending")

    # ------------------------------------------------------------------ the block

    def __enter__(self) -> Plan:
        global ACTIVE
        if ACTIVE is not None:
            raise RuntimeError("a plan is already collecting runs")
        ACTIVE = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        global ACTIVE
        ACTIVE = None
        if exc_type is None:
            self.estimate()
            print(self.table())
            self.enforce()
        return False

    def estimate(self) -> float:
        """Time every group of missing runs (module docstring) and return the ETA in seconds."""
        t0 = time.perf_counter()
        groups: dict = {}
        for p in self.pending:
            groups.setdefault(cache.key_hash(p.group), []).append(p)
        self.rows = []
        for members in groups.values():
            first = members[0]
            chunk = min(first.stack, len(members))
            cost = first.measure(members[:chunk], self.warm, self.timed)
            n_chunks = math.ceil(len(members) / chunk)
            self.rows.append(
                {
                    "what": first.describe(),
                    "runs": len(members),
                    "chunks": n_chunks,
                    "steps": first.steps,
                    **cost,
                    "total_s": n_chunks * cost["run_s"],
                }
            )
        self.eta_s = sum(r["total_s"] for r in self.rows)
        self.measure_s = time.perf_counter() - t0
        return self.eta_s

    def table(self) -> str:
        dev = self.dev
        if dev is None:
            from .train import device

            dev = device()
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU"
        n_stored = sum(self.stored.values())
        lines = [
            f"plan: {len(self.pending) + n_stored} runs; {n_stored} stored ({self.stored['cache']} in the local cache, "
            f"{self.stored['results']} in results/), {len(self.pending)} to train on {name}"
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
        return "\n".join(lines)

    def enforce(self) -> None:
        """Raise :class:`BudgetExceeded` when the ETA is over ``max_minutes``."""
        if self.max_minutes is not None and self.eta_s > 60 * self.max_minutes:
            raise BudgetExceeded(
                f"the runs still to train need about {self.eta_s / 60:.1f} min here, over MAX_MINUTES = "
                f"{self.max_minutes:g}; nothing was trained. Raise MAX_MINUTES (None: no limit), take a smaller "
                f"preset" + (f", or lower {self.hint}" if self.hint else "") + "."
            )

    def summary(self) -> dict:
        """What goes into the claims JSON."""
        return {
            "to_train": len(self.pending),
            "stored": dict(self.stored),
            "eta_s": round(self.eta_s, 1),
            "measure_s": round(self.measure_s, 1),
            "max_minutes": self.max_minutes,
        }
