"""The one training loop every notebook uses: SGD with momentum, a step budget, schedules,
periodic evaluation and callbacks, checkpoint/resume (docs/protocol.md, "Optimiser").

On CUDA: bf16 autocast, channels_last, ``cudnn.benchmark``, training and evaluation sets resident
on the GPU. On the CPU: fp32, and malloc keeps the memory freed tensors leave for the next step
(:func:`keep_freed_memory`). :func:`cached_train` builds a run from its spec and goes through the
run cache. The history is plain data (lists of floats) that serialises to JSON::

    {"train": {"step": [...], "loss": [...], "acc": [...]},      # running means between logs
     "eval":  {"step": [...], "<set>_loss": [...], "<set>_acc": [...]},
     "callbacks": {"step": [...], "<key>": [...]},               # steps where any callback ran; each
                                                                 # callback's values at its own steps
     "steps": total_steps, "wall_s": seconds}
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import budget, cache
from .data import DeviceLoader


def device(prefer: Optional[str] = None) -> torch.device:
    """``cuda`` when available (or ``prefer`` when given), else ``cpu``."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reproducible(threads: Optional[int] = None) -> dict:
    """Make CPU runs repeatable: fix torch's intra-op thread count (``threads``; None keeps the
    current one) and, on a machine without CUDA, ask for deterministic algorithms. Returns what
    was set. The same command on the same machine then gives bit-identical runs (tested in a
    fresh process). On CUDA nothing is forced: bf16 autocast, cuDNN's benchmark-chosen kernels
    and atomic reductions make GPU runs differ in their last bits (docs/reproducibility.md)."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    det = not torch.cuda.is_available()
    if det:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return {"threads": torch.get_num_threads(), "deterministic_algorithms": det}


_MALLOC = {"keeps_freed_memory": None}  # None: not asked yet in this process


def keep_freed_memory() -> bool:
    """Ask glibc's malloc (Linux) to serve large blocks from its heap and never hand freed memory
    back to the system: ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, -1)``. By
    default, blocks above malloc's mmap threshold (raised as such blocks are freed, up to 32 MB)
    are fresh ``mmap`` mappings, unmapped when freed, and the free top of the heap goes back to the
    system; memory that comes back from the system is zero-filled page by page at first touch.
    Depending on what the process allocated before, a CPU training step then pays tens of
    thousands of page faults for its activations and gradients, every step. Kept, the same blocks
    are reused from one step to the next; the process holds on to its peak memory. Numbers are
    unchanged (docs/reproducibility.md gives the measurements). Called by :func:`train` and
    ``train_stacked`` on the CPU; once per process. Returns whether malloc took the settings
    (False elsewhere than glibc)."""
    if _MALLOC["keeps_freed_memory"] is None:
        ok = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
                ok = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
            except (OSError, AttributeError):  # not glibc: musl has no mallopt
                pass
        _MALLOC["keeps_freed_memory"] = ok
    return _MALLOC["keeps_freed_memory"]


def malloc_keeps_freed_memory() -> Optional[bool]:
    """What :func:`keep_freed_memory` did in this process: None when it was not called (nothing
    trained on the CPU yet)."""
    return _MALLOC["keeps_freed_memory"]


def lr_at(
    step: int,
    total: int,
    lr: float,
    schedule: str = "constant",
    milestones: Sequence[float] = (1 / 3, 2 / 3),
    gamma: float = 1 / 3,
) -> float:
    """Learning rate at ``step`` of ``total``: ``"constant"``; ``"step"`` (multiply by ``gamma``
    at each milestone, given as fractions of ``total``); ``"cosine"`` (to 0 at ``total``)."""
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** sum(step >= round(m * total) for m in milestones)
    if schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * step / total))
    raise ValueError(f"unknown schedule {schedule!r} (constant, step, cosine)")


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: float32 (from bf16 under autocast), float64 kept as it is."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _autocast(dev: torch.device):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000, dev: Optional[torch.device] = None
) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``x (N, ...)``, ``y (N,)``, in eval mode,
    in batches of ``batch_size`` (tensors may live on the CPU or the device)."""
    dev = dev or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for s in range(0, len(y), batch_size):
        xb = x[s : s + batch_size].to(dev, non_blocking=True)
        yb = y[s : s + batch_size].to(dev, non_blocking=True)
        if xb.dim() == 4 and dev.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(dev):
            out = model(xb)
        loss_sum += F.cross_entropy(_wide(out), yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


def _append(table: dict, key: str, value) -> None:
    table.setdefault(key, []).append(value)


def n_steps(steps: Optional[int], epochs: Optional[float], n: int, batch_size: int) -> int:
    """A run's step budget on ``n`` examples: ``steps``, or ``ceil(epochs * n / min(batch_size, n))``."""
    if steps is not None:
        return int(steps)
    if epochs is None:
        raise ValueError("give steps or epochs")
    return math.ceil(epochs * n / min(batch_size, n))


def _due(every, s: int) -> bool:
    """Whether schedule ``every`` (a period or a list of steps) is due at step ``s``."""
    return (s in every) if isinstance(every, (set, list, tuple)) else (s % every == 0)


def _recorded_at(s: int, steps: int, every, at=()) -> bool:
    """Whether a run of ``steps`` steps records something (evaluates its sets, calls a callback) at step
    ``s``: always at step 0 and at the end, at the steps in ``at``, and where schedule ``every`` (a period,
    a list of steps, or None) is due."""
    return s == 0 or s == steps or s in at or bool(every and _due(every, s))


def _due_callbacks(callbacks, s: int, steps: int) -> list:
    """The callback functions of ``callbacks`` (``(every, fn)`` pairs) that run at step ``s`` of ``steps``
    (:func:`_recorded_at`)."""
    return [fn for every, fn in callbacks if _recorded_at(s, steps, every)]


def _record_callbacks(table: dict, due: list, model, s: int) -> None:
    """Call each function in ``due`` as ``fn(model, s)`` and append its values to ``table`` (lists of floats stay
    lists), with ``s`` appended once to ``table["step"]`` when anything ran."""
    if due:
        _append(table, "step", s)
    for fn in due:
        for key, val in fn(model, s).items():
            _append(table, key, [float(v) for v in val] if isinstance(val, (list, tuple)) else float(val))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    schedule: str = "constant",
    milestones: Sequence[float] = (1 / 3, 2 / 3),
    gamma: float = 1 / 3,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    data_seed: int = 0,
    augment: bool = False,
    eval_sets: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    eval_every: Optional[int] = None,
    eval_at: Sequence[int] = (),
    callbacks: Sequence[Tuple[int, Callable]] = (),
    log_every: int = 50,
    dev: Optional[torch.device] = None,
    checkpoint_path: Optional[os.PathLike] = None,
    checkpoint_every: Optional[int] = None,
    checkpoint_every_s: float = 300.0,
    desc: str = "train",
) -> dict:
    """Train ``model`` in place on ``x (N, ...) float32``, ``y (N,) int64`` with SGD and
    cross-entropy; return the history (see the module docstring).

    Budget: ``steps``, or ``epochs`` (``ceil(epochs * N / batch_size)`` steps). ``eval_sets``
    maps names to full sets evaluated at step 0, every ``eval_every`` steps, at the steps in
    ``eval_at`` and at the end. ``callbacks`` are ``(every, fn)`` pairs; ``fn(model, step)``
    returns a dict of floats (or lists of floats), recorded at step 0, at the end, and every
    ``every`` steps (an int) or at the listed steps (a list, tuple or set).
    ``data_seed`` fixes the batch order (the init is the caller's). ``dtype``: the floating
    type of the model and the data (float64 for exact comparisons). With ``checkpoint_path``
    the run saves its full state every ``checkpoint_every`` steps, or (when that is None) every
    ``checkpoint_every_s`` seconds of wall time, so short runs write none; it resumes from
    that file, ending with the same result as an uninterrupted run on the CPU. Evaluation sets
    are moved to the device once, at the start.
    """
    dev = dev or device()
    steps = n_steps(steps, epochs, len(y), batch_size)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(dev, dtype, memory_format=torch.channels_last)
    else:
        keep_freed_memory()
        model = model.to(dev, dtype)
    model.train()
    loader = DeviceLoader(x, y, batch_size, dev, data_seed, augment=augment, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    eval_sets = {name: (xe.to(dev, dtype), ye.to(dev)) for name, (xe, ye) in (eval_sets or {}).items()}
    if dev.type == "cuda":
        eval_sets = {
            name: (xe.contiguous(memory_format=torch.channels_last) if xe.dim() == 4 else xe, ye)
            for name, (xe, ye) in eval_sets.items()
        }
    eval_at = set(eval_at)
    hist = {"train": {}, "eval": {}, "callbacks": {}}
    step, run_loss, run_acc, run_n = 0, 0.0, 0.0, 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if ckpt is not None and ckpt.is_file():
        # on the CPU first: the loader's generator state must stay a CPU ByteTensor; the model and
        # optimiser copy their tensors to the device themselves
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        loader.load_state_dict(state["loader"])
        hist, step = state["hist"], state["step"]
        run_loss, run_acc, run_n = state["running"]

    def record(s: int) -> None:
        if eval_sets and _recorded_at(s, steps, eval_every, eval_at):
            _append(hist["eval"], "step", s)
            for name, (xe, ye) in eval_sets.items():
                loss, acc = evaluate(model, xe, ye, dev=dev)
                _append(hist["eval"], f"{name}_loss", loss)
                _append(hist["eval"], f"{name}_acc", acc)
        _record_callbacks(hist["callbacks"], _due_callbacks(callbacks, s, steps), model, s)

    from tqdm import tqdm  # plain text bars: they reach a terminal from papermill and in-process runs alike

    bar = tqdm(total=steps, initial=step, desc=desc, disable=bool(os.environ.get("CI")), leave=False, mininterval=1.0)
    t0 = last_ckpt = time.time()
    if step == 0:
        record(0)
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, schedule, milestones, gamma)
        xb, yb = loader.next_batch()
        with _autocast(dev):
            out = model(xb)
        loss = F.cross_entropy(_wide(out), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        # .item() syncs; only pay it when logging (accumulate on the device otherwise)
        run_loss += loss.detach()
        run_acc += (out.argmax(1) == yb).to(torch.float64).mean()
        run_n += 1
        if step % log_every == 0 or step == steps:
            _append(hist["train"], "step", step)
            _append(hist["train"], "loss", float(run_loss) / run_n)
            _append(hist["train"], "acc", float(run_acc) / run_n)
            bar.set_postfix(loss=f"{hist['train']['loss'][-1]:.3f}", acc=f"{hist['train']['acc'][-1]:.3f}")
            run_loss, run_acc, run_n = 0.0, 0.0, 0
        if step < steps:
            record(step)
        bar.update(1)
        due = (step % checkpoint_every == 0) if checkpoint_every else (time.time() - last_ckpt >= checkpoint_every_s)
        if ckpt is not None and due and step < steps:
            last_ckpt = time.time()
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "loader": loader.state_dict(),
                    "hist": hist,
                    "step": step,
                    "running": (float(run_loss), float(run_acc), run_n),
                },
                tmp,
            )
            os.replace(tmp, ckpt)
    record(steps)
    bar.close()
    hist["steps"] = steps
    hist["wall_s"] = hist.get("wall_s", 0.0) + time.time() - t0
    return hist


#: ``train`` arguments that do not change what a run computes (left out of its cache key).
_NOT_IN_KEY = {
    "model",
    "x",
    "y",
    "eval_sets",
    "callbacks",
    "dev",
    "checkpoint_path",
    "checkpoint_every",
    "checkpoint_every_s",
    "desc",
}


def train_arguments(train_kwargs: dict) -> dict:
    """The arguments of :func:`train` that decide what a run computes (those in ``train_kwargs``, every
    other one at its default), as they enter the run's key. Raises TypeError for one that is not keyed
    (data, evaluation sets, callbacks, device, checkpointing: the callers pass them themselves)."""
    bad = set(train_kwargs) & _NOT_IN_KEY
    if bad:
        raise TypeError(f"pass {sorted(bad)} through cached_train's own arguments")
    bound = inspect.signature(train).bind_partial(**train_kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in _NOT_IN_KEY}


def _train_key(model, x, y, init, probes, eval_sets, keep, train_kwargs) -> dict:
    """The cache key of one run of :func:`cached_train` (also used by :func:`cached_train_many`)."""
    hyper = train_arguments(train_kwargs)
    return cache.run_key(
        model=model, init=init, x=x, y=y, eval_sets=eval_sets or {}, probes=list(probes), keep=sorted(keep), train=hyper
    )


def _build(model, init, keep: Sequence[str]) -> tuple:
    """A fresh network of ``model`` (a ModelSpec) with ``init`` applied (None: as built), and a copy of its
    state dict when ``keep`` asks for ``"init"`` (else None): ``(net, start)``."""
    net = model.build()
    if init is not None:
        init.apply(net)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()} if "init" in keep else None
    return net, start


def _finished(net: nn.Module, start: Optional[dict], hist: dict, keep: Sequence[str]) -> tuple:
    """``(history, states)`` of a trained run as the cache stores it: ``hist`` with the device named under
    ``"device"``, and the states ``keep`` asks for (``"init"``: ``start``; ``"trained"``: the state dict after
    training; ``"first_layer"``: the first layer's)."""
    from .models import first_layer

    hist["device"] = str(torch.cuda.get_device_name(0) if next(net.parameters()).is_cuda else "cpu")
    states = {}
    if "init" in keep:
        states["init"] = start
    if "trained" in keep:
        states["trained"] = net.state_dict()
    if "first_layer" in keep:
        states["first_layer"] = first_layer(net).state_dict()
    return hist, states


def cached_train(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    init=None,
    probes: Sequence = (),
    eval_sets: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    keep: Sequence[str] = (),
    export: Optional[str] = None,
    force: bool = False,
    need_states: bool = False,
    dev: Optional[torch.device] = None,
    desc: str = "train",
    **train_kwargs,
) -> cache.CachedResult:
    """Build, train and cache one run; the run's key is made from exactly these arguments.

    ``model``: a :class:`common.models.ModelSpec` (builder name and arguments, seed included).
    ``init``: optional object with ``apply(model)`` and ``key()`` that changes the fresh model
    before training (a transfer variant, :class:`common.transfer.Variant`). ``x (N, ...)``,
    ``y (N,)`` and ``eval_sets`` enter the key by content. ``probes``: :mod:`common.probes`
    objects, recorded in ``history["callbacks"]``. ``keep``: states to store with the run:
    ``"init"`` (the state dict before training), ``"trained"`` (after), ``"first_layer"`` (the
    first layer's state dict after training). ``train_kwargs`` go to :func:`train`, every default
    filled in before keying. ``export="<figure>"`` writes the history to ``results/<figure>/``.
    Returns :class:`common.cache.CachedResult`.
    """
    key = _train_key(model, x, y, init, probes, eval_sets, keep, train_kwargs)
    if budget.planning():  # inside a Plan nothing trains: a stored run or a placeholder comes back
        return budget.ACTIVE.add(key, force, model, x, y, probes, eval_sets, train_kwargs)

    def fn(scratch):
        net, start = _build(model, init, keep)
        hist = train(
            net,
            x,
            y,
            eval_sets=eval_sets,
            callbacks=[(p.every, p) for p in probes],
            dev=dev,
            checkpoint_path=scratch / "ckpt.pt",
            desc=desc,
            **train_kwargs,
        )
        return _finished(net, start, hist, keep)

    return cache.cached_run(key, fn, force=force, need_states=need_states, export=export)


def cached_train_many(
    models: Sequence,
    x: torch.Tensor,
    ys,
    *,
    data_seeds: Sequence[int],
    inits: Optional[Sequence] = None,
    stack: int = 1,
    probes: Sequence = (),
    eval_sets: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    keep: Sequence[str] = (),
    export: Optional[str] = None,
    force: bool = False,
    dev: Optional[torch.device] = None,
    desc: str = "train",
    **train_kwargs,
) -> list:
    """Many independent runs of :func:`cached_train` (``models[i]`` a ModelSpec, labels ``ys`` or
    ``ys[i]``, ``data_seed=data_seeds[i]``, ``init=inits[i]`` when ``inits`` is given, an entry None for
    no init), each cached under the very key ``cached_train`` gives it.
    The missing ones are trained ``stack`` at a time with :func:`common.stacked.train_stacked` (2-layer
    CNN and FC nets; ``stack=1`` trains them one by one). A stacked member follows its sequential
    trajectory up to the kernels' summation order, so use ``stack > 1`` where runs are not compared bit
    for bit (the GPU presets). Returns the :class:`common.cache.CachedResult` of every run, in order."""
    from .stacked import train_stacked

    n = len(models)
    ys = list(ys) if isinstance(ys, (list, tuple)) else [ys] * n
    inits = list(inits) if inits is not None else [None] * n
    if not len(ys) == len(data_seeds) == len(inits) == n:
        raise ValueError("give one label tensor (or one for all), one data seed and one init (or none) per model")
    keys = [
        _train_key(m, x, yi, init, probes, eval_sets, keep, {**train_kwargs, "data_seed": s})
        for m, yi, init, s in zip(models, ys, inits, data_seeds)
    ]
    if budget.planning():
        return [
            budget.ACTIVE.add(k, force, m, x, yi, probes, eval_sets, {**train_kwargs, "data_seed": s}, stack)
            for k, m, yi, s in zip(keys, models, ys, data_seeds)
        ]

    def one(i):
        return cached_train(
            models[i],
            x,
            ys[i],
            init=inits[i],
            probes=probes,
            eval_sets=eval_sets,
            keep=keep,
            export=export,
            force=force,
            dev=dev,
            desc=f"{desc} {i}",
            data_seed=data_seeds[i],
            **train_kwargs,
        )

    if stack <= 1:
        return [one(i) for i in range(n)]
    out = [None if force else cache.lookup(k, recompute=lambda i=i: one(i)) for i, k in enumerate(keys)]
    for r in out:
        if r is not None:
            cache.LEDGER.append(r)
    if train_kwargs.get("augment"):
        raise ValueError("the stacked trainer does not augment")
    todo = [i for i, r in enumerate(out) if r is None]
    stacked_kwargs = {k: v for k, v in train_kwargs.items() if k != "augment"}
    for a in range(0, len(todo), stack):
        chunk = todo[a : a + stack]
        built = [_build(models[i], inits[i], keep) for i in chunk]
        hists = train_stacked(
            [net for net, _ in built],
            x,
            [ys[i] for i in chunk],
            data_seeds=[data_seeds[i] for i in chunk],
            eval_sets=eval_sets,
            callbacks=[(p.every, p) for p in probes],
            dev=dev,
            desc=f"{desc} {chunk[0]}-{chunk[-1]}",
            **stacked_kwargs,
        )
        for i, (net, start), hist in zip(chunk, built, hists):
            run = _finished(net, start, hist, keep)
            out[i] = cache.cached_run(keys[i], lambda scratch, run=run: run, force=True, export=export)
    return out
