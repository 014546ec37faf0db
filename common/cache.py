"""Run cache: re-running a notebook to restyle a plot never retrains, and never serves a stale run.

A run's key is built in one place, :func:`run_key`, from the values that define the run:

- every argument the caller passes (model spec, training arguments, seeds, probes, ...),
  with tensors replaced by a fingerprint of their bytes (so the data a run trains on is part of
  its key, whatever the notebook calls it);
- :func:`code_fingerprint`: a hash of the source of the modules that produce runs
  (:data:`CODE_MODULES`), comments, docstrings and blank lines removed, so editing the training
  loop, a model or a probe invalidates every run made with the old code;
- :data:`CACHE_VERSION`, for changes of the entry format.

:func:`cached_run` stores an entry under ``runs/cache/<hash>/`` (or ``$RUNS_DIR/cache``):
``key.json`` (the full key and the git commit that made it), ``history.json`` and ``states.pt``.
On a hit the stored key must equal the requested one, or the entry is recomputed. Entries are
written into a temporary folder and renamed into place, so an interrupted run never leaves an
entry that looks complete; a scratch folder ``<hash>.partial/`` keeps checkpoints across
interruptions.

Committed results (``results/<figure>/<hash>.json``: key and history, no weights) are consulted
after the local cache, so a ``paper`` figure made on a GPU re-plots anywhere without training.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import time
import tokenize
import uuid
import weakref
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .data import REPO_ROOT

#: Bump when the layout or meaning of a stored entry changes.
CACHE_VERSION = "2"

#: Modules whose code decides what a run computes; their normalised source is in every key.
CODE_MODULES = ("alignment", "data", "models", "probes", "stacked", "train", "transfer")

#: Runs computed or read in this process, in order (``Notebook`` summarises them).
LEDGER: list = []


# --------------------------------------------------------------------------- fingerprints


def _normalised_source(path: Path) -> str:
    """The module's source without comments, docstrings and blank lines (the code that runs)."""
    import ast

    text = path.read_text()
    doc_lines = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = text.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    kept = [ln.rstrip() for i, ln in enumerate(lines, 1) if i not in doc_lines and ln.strip()]
    return "\n".join(kept)


_CODE_FP: dict = {}


def code_fingerprint(modules=CODE_MODULES, folder: Optional[os.PathLike] = None) -> str:
    """16 hex digits of a hash of the normalised source of ``<folder>/<module>.py`` for each
    module (default folder: this package). Computed once per process."""
    folder = Path(folder) if folder is not None else Path(__file__).parent
    key = (tuple(modules), str(folder))
    if key not in _CODE_FP:
        h = hashlib.sha256()
        for name in sorted(modules):
            h.update(name.encode() + b"\0" + _normalised_source(folder / f"{name}.py").encode())
        _CODE_FP[key] = h.hexdigest()[:16]
    return _CODE_FP[key]


_TENSOR_FP: dict = {}  # id(tensor) -> (weak reference, its _version when hashed, fingerprint)


def tensor_fingerprint(t) -> str:
    """``"<dtype><shape>:<16 hex digits>"`` of a tensor's or array's bytes. Memoised per live
    tensor object and invalidated by in-place changes (``_version``), so a 50k-image set is hashed
    once per process."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    memo = _TENSOR_FP.get(id(t))
    if memo is not None and memo[0]() is t and memo[1] == t._version:
        return memo[2]
    d = t.detach()
    arr = (d.float() if d.dtype == torch.bfloat16 else d).cpu().contiguous().numpy()
    digest = hashlib.blake2b(arr.tobytes(), digest_size=8).hexdigest()
    fp = f"{str(d.dtype).replace('torch.', '')}{list(d.shape)}:{digest}"
    _TENSOR_FP[id(t)] = (weakref.ref(t), t._version, fp)
    return fp


def keyed(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, each tensor it returns keyed in run keys by how it was made (``fn``'s name and
    its arguments, themselves canonical) instead of by its bytes: ``{"made_by": {"fn", "args", "kwargs"[,
    "output"]}}``.

    For tensors computed by floating-point linear algebra from keyed inputs, such as Figure 2's bases (an
    eigen-decomposition, a QR). LAPACK's last bits differ between machines and thread counts, so a key on those
    bytes would not find on a laptop the runs a GPU machine stored in ``results/`` (docs/reproducibility.md,
    "Run keys across machines"). ``fn`` must be a function of one of :data:`CODE_MODULES`, whose source is in
    every key, so a change to what it computes still changes the key. A tuple result is keyed element by element
    (``"output": i``); arguments may be keyed results in turn. A returned tensor changed in place afterwards is
    keyed by its bytes again. Raises TypeError for any other ``fn`` or a result that is not tensors."""
    module = getattr(fn, "__module__", "") or ""
    package, _, name = module.rpartition(".")
    if package != __package__ or name not in CODE_MODULES:
        raise TypeError(f"keyed() takes a function of common.{{{', '.join(CODE_MODULES)}}}, not {module}")
    recipe = {"fn": f"{name}.{fn.__qualname__}", "args": canonical(list(args)), "kwargs": canonical(kwargs)}
    out = fn(*args, **kwargs)
    many = isinstance(out, tuple)
    for i, t in enumerate(out if many else (out,)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"keyed(): {recipe['fn']} returned a {type(t).__name__}, not tensors")
        t._made_by = (dict(recipe, output=i) if many else recipe, t._version)
    return out


def canonical(obj):
    """A JSON-able, order-independent description of ``obj``: tensors and arrays become
    fingerprints (or, made by :func:`keyed`, their recipe), objects with a ``key()`` method (probes, specs) their
    key, tuples lists. Raises TypeError for anything else, functions included (a name says nothing about what a
    function computes), rather than guess."""
    made_by = getattr(obj, "_made_by", None)
    if isinstance(obj, torch.Tensor) and made_by is not None and made_by[1] == obj._version:
        return {"made_by": made_by[0]}
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return {"tensor": tensor_fingerprint(obj)}
    if hasattr(obj, "key") and callable(obj.key):
        return canonical(obj.key())
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(v) for v in obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"cannot put a {type(obj).__name__} into a run key; pass plain values, tensors or specs")


def run_key(**parts) -> dict:
    """The full key of a run: its defining ``parts`` (see :func:`canonical`) plus the code
    fingerprint and the cache version. This is the only place a key is built."""
    return {"parts": canonical(parts), "code": code_fingerprint(), "version": CACHE_VERSION}


def key_hash(key: dict) -> str:
    """Stable 16-hex-digit hash of a key (dict order does not matter)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- storage


def cache_dir() -> Path:
    """``$RUNS_DIR/cache`` when set, else ``<repo>/runs/cache``."""
    base = os.environ.get("RUNS_DIR")
    return (Path(base) if base else REPO_ROOT / "runs") / "cache"


def results_dir() -> Path:
    """``$RESULTS_DIR`` when set, else ``<repo>/results`` (committed per-run records)."""
    return Path(os.environ.get("RESULTS_DIR") or REPO_ROOT / "results")


def git_commit() -> str:
    """Short commit of the repository, with ``+dirty`` when ``common/`` or ``notebooks/`` has
    uncommitted changes. Outside a git checkout (a copied working tree without ``.git``, as a lent
    GPU machine may run it): ``$GIT_COMMIT`` when set, else ``"unknown"``."""
    declared = os.environ.get("GIT_COMMIT", "").strip() or "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return declared
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "common", "notebooks"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return declared


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


class CachedResult:
    """One run: ``history`` (JSON-able dict), ``states`` (dict of tensors / state dicts on the
    CPU), ``key`` (its full key), ``hash``, ``path`` (entry folder or results file), ``source``
    (``"computed"``, ``"cache"`` or ``"results"``) and ``hit``.

    A local entry's weights are read from disk the first time ``states`` is asked for (a look-up that only needs
    the history reads no weights); an unreadable file is recomputed then. An entry read from ``results/`` has no
    weights: asking for ``states`` then recomputes the run once (and stores it in the local cache)."""

    def __init__(self, key, history, states, path, source, recompute=None, load=None):
        self.key, self.history, self.path, self.source = key, history, Path(path), source
        self.hash = key_hash(key)
        self._states, self._recompute, self._load = states, recompute, load

    @property
    def hit(self) -> bool:
        return self.source != "computed"

    @property
    def states(self) -> dict:
        if self._states is None and self._load is not None:
            try:
                self._states = self._load()
            except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
                print(f"cache: weights of {self.path.name} unreadable ({type(err).__name__}: {err}); recomputing")
            self._load = None
        if self._states is None:
            if self._recompute is None:
                raise RuntimeError(f"run {self.hash} has no stored weights")
            if self.source == "results":
                print(f"cache: run {self.hash} is stored in results/ without weights; training it again for them")
            with torch.enable_grad():  # the reader may hold no_grad (a transfer's apply): training needs autograd
                fresh = self._recompute()
            self._states = fresh.states
        return self._states


def _read_local(entry: Path, key: dict) -> Optional[tuple]:
    try:
        stored = json.loads((entry / "key.json").read_text())
        if stored.get("key") != key:
            print(f"cache: entry {entry.name} holds a different key; recomputing it")
            return None
        history = json.loads((entry / "history.json").read_text())
        if not (entry / "states.pt").is_file():
            raise OSError("states.pt missing")
        return history, lambda: torch.load(entry / "states.pt", map_location="cpu", weights_only=False)
    except (OSError, ValueError, RuntimeError, EOFError) as err:
        print(f"cache: entry {entry.name} unreadable ({type(err).__name__}: {err}); recomputing it")
        return None


def _read_results(h: str, key: dict) -> Optional[tuple]:
    base = results_dir()
    if not base.is_dir():
        return None
    for path in sorted(base.glob(f"*/{h}.json")):
        doc = json.loads(path.read_text())
        if doc.get("key") == key:
            return doc["history"], path
    return None


def export_result(result: CachedResult, figure: str) -> Path:
    """Write ``results/<figure>/<hash>.json`` (key, history, commit; no weights) for committing. The file
    is written aside and renamed into place, so a process killed while writing (a GPU script's time
    limit) leaves either the whole file or none, never a truncated one that later look-ups would fail on."""
    path = results_dir() / figure / f"{result.hash}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"key": result.key, "history": result.history, "git_commit": git_commit()}
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def lookup(key: dict, root: Optional[os.PathLike] = None, recompute: Optional[Callable] = None):
    """The stored run for ``key`` (local cache first, then ``results/``), or None. A run from
    ``results/`` has no weights; ``recompute`` (a function returning a :class:`CachedResult`)
    supplies them when ``states`` is read."""
    base = Path(root) if root is not None else cache_dir()
    h = key_hash(key)
    if (base / h).is_dir():
        got = _read_local(base / h, key)
        if got is not None:
            return CachedResult(key, got[0], None, base / h, "cache", recompute=recompute, load=got[1])
    got = _read_results(h, key)
    if got is not None:
        return CachedResult(key, got[0], None, got[1], "results", recompute=recompute)
    return None


def cached_run(
    key: dict,
    fn: Callable[[Path], tuple],
    force: bool = False,
    root: Optional[os.PathLike] = None,
    need_states: bool = False,
    export: Optional[str] = None,
) -> CachedResult:
    """Return the stored run for ``key`` (built by :func:`run_key`), or compute it with ``fn``.

    ``fn(scratch_dir)`` returns ``(history, states)``: a JSON-able dict and a dict of tensors
    or state dicts (may be empty). ``scratch_dir`` survives interruptions: keep the training
    checkpoint there. Look-up order: the local cache, then ``results/`` (history only: with
    ``need_states`` such an entry is recomputed at once, otherwise when ``states`` is first
    read). ``force=True`` recomputes. ``export="<figure>"`` also writes the run to
    ``results/<figure>/`` (see :func:`export_result`).
    """
    if not isinstance(key, dict) or set(key) != {"parts", "code", "version"}:
        raise ValueError("cached_run needs a key built by run_key(...)")
    base = Path(root) if root is not None else cache_dir()
    h = key_hash(key)
    result = None if force else lookup(key, root, recompute=lambda: cached_run(key, fn, True, root))
    if result is not None and need_states:
        result._states = result.states
    if result is None:
        result = _compute(key, h, fn, base, force)
    if export and result.source != "results":
        export_result(result, export)
    LEDGER.append(result)
    return result


def _compute(key: dict, h: str, fn: Callable, base: Path, force: bool) -> CachedResult:
    scratch = base / f"{h}.partial"
    if force and scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    history, states = fn(scratch)
    states = _to_cpu(states or {})
    doc = {
        "key": key,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "compute_s": round(time.time() - t0, 2),
    }
    tmp = base / f"{h}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    (tmp / "key.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    (tmp / "history.json").write_text(json.dumps(history))
    torch.save(states, tmp / "states.pt")
    entry = base / h
    if entry.exists():
        shutil.rmtree(entry)
    os.rename(tmp, entry)
    shutil.rmtree(scratch, ignore_errors=True)
    return CachedResult(key, history, states, entry, "computed")
