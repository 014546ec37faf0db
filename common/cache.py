"""Run cache: re-running a notebook to restyle a plot never retrains.

``cached_run(config, fn)`` keys on a stable hash of the whole config plus :data:`CACHE_VERSION`
and stores the result under ``runs/cache/<hash>/`` (or ``$RUNS_DIR/cache/<hash>/``):
``config.json``, ``history.json`` and ``states.pt``. Entries are written into a temporary folder
and renamed into place, so an interrupted run never leaves an entry that looks complete. Long
runs get a scratch folder ``<hash>.partial/`` for checkpoints, kept across interruptions and
removed once the entry is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from .data import REPO_ROOT

#: Bump when the meaning of a cached result changes (training loop, init, metrics).
CACHE_VERSION = "1"


class CachedResult(NamedTuple):
    history: dict          # JSON-able history returned by fn
    states: dict           # {name: state_dict or tensor}, on the CPU
    path: Path             # the entry's folder
    hit: bool              # True when read from the cache


def cache_dir() -> Path:
    """``$RUNS_DIR/cache`` when set, else ``<repo>/runs/cache``."""
    base = os.environ.get("RUNS_DIR")
    return (Path(base) if base else REPO_ROOT / "runs") / "cache"


def config_hash(config: dict) -> str:
    """Stable 16-hex-digit hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps({"config": config, "version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def cached_run(config: dict, fn: Callable[[Path], tuple], force: bool = False,
               root: Optional[os.PathLike] = None) -> CachedResult:
    """Return the stored result for ``config``, or compute it with ``fn`` and store it.

    ``fn(scratch_dir)`` returns ``(history, states)``: a JSON-able dict and a dict of tensors or
    state dicts (may be empty). ``scratch_dir`` survives interruptions: pass a file in it as the
    training checkpoint to resume. ``force=True`` recomputes and replaces the entry.
    """
    base = Path(root) if root is not None else cache_dir()
    key = config_hash(config)
    entry = base / key
    if entry.is_dir() and not force:
        history = json.loads((entry / "history.json").read_text())
        states = torch.load(entry / "states.pt", map_location="cpu", weights_only=False)
        return CachedResult(history, states, entry, True)
    scratch = base / f"{key}.partial"
    if force and scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    history, states = fn(scratch)
    states = _to_cpu(states or {})
    tmp = base / f"{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    (tmp / "history.json").write_text(json.dumps(history))
    torch.save(states, tmp / "states.pt")
    if entry.exists():
        shutil.rmtree(entry)
    os.rename(tmp, entry)
    shutil.rmtree(scratch, ignore_errors=True)
    return CachedResult(history, states, entry, False)
