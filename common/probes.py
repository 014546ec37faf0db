"""Measurements taken during training (the callbacks of :func:`common.train.train`).

A probe is called as ``probe(model, step)`` and returns a dict of floats or lists of floats; its
``every`` says when (an int period or a list of steps) and its ``key()`` describes it completely
(tensors included), so the run cache knows when a stored history holds different measurements.
"""

from __future__ import annotations

from typing import Dict, Sequence, Union

import torch
from torch import nn

from . import alignment as A
from .models import first_layer

Every = Union[int, Sequence[int]]


class Probe:
    """Base class: ``every`` (int period or list of steps) and ``key()``."""

    name = "probe"

    def __init__(self, every: Every):
        self.every = every if isinstance(every, int) else [int(s) for s in every]

    def params(self) -> dict:
        return {}

    def key(self) -> dict:
        return {"probe": self.name, "every": self.every, **self.params()}

    def __call__(self, model, step) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class FirstLayerMisalignment(Probe):
    """Misalignment M of the first layer's filter covariance with each basis in ``bases``
    (``{name: (d, d) float64 orthonormal columns}``; Figure 2). Records ``M_<name>``.
    ``centered`` picks the covariance estimator (``weight_covariance``)."""

    name = "first_layer_misalignment"

    def __init__(self, bases: Dict[str, torch.Tensor], every: Every, centered: bool = True):
        super().__init__(every)
        self.bases = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in bases.items()}
        self.centered = centered

    def params(self):
        return {"bases": self.bases, "centered": self.centered}

    def __call__(self, model, step):
        sigma_w = A.weight_covariance(A.filter_matrix(first_layer(model)), centered=self.centered)
        return {f"M_{k}": A.misalignment(sigma_w, B) for k, B in self.bases.items()}


class FirstLayerSecondMoment(Probe):
    """The first layer's second moment ``W^T W / m`` (``(d, d)``, flattened row-major into
    ``S``), from which f is read off against any basis afterwards (Figure 4)."""

    name = "first_layer_second_moment"

    def __call__(self, model, step):
        return {"S": A.second_moment(A.filter_matrix(first_layer(model))).flatten().tolist()}


class FirstLayerFilters(Probe):
    """The first layer's filters ``(m, d)`` flattened row-major into ``W`` (Figure 3)."""

    name = "first_layer_filters"

    def __call__(self, model, step):
        return {"W": A.filter_matrix(first_layer(model)).flatten().tolist()}


class ReluActivity(Probe):
    """How much of each ReLU layer fires on the fixed inputs ``x (N, ...)`` (:func:`relu_activity`): records
    ``active_fraction`` and ``dead_channels``, one float per ``nn.ReLU`` module. Recorded at step 0 it is the
    state at the switch to the downstream task, so the measurement needs no stored weights."""

    name = "relu_activity"

    def __init__(self, x: torch.Tensor, every: Every):
        super().__init__(every)
        self.x = x

    def params(self):
        return {"x": self.x}

    def __call__(self, model, step):
        return relu_activity(model, self.x)


@torch.no_grad()
def relu_activity(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> Dict[str, list]:
    """Per ReLU layer, how much of it fires on the inputs ``x (N, ...)`` (the paper's Section 3:
    units stop firing on new data after random-label pre-training).

    Returns ``{"active_fraction": [...], "dead_channels": [...]}``, one float per ``nn.ReLU`` module
    in forward order: the fraction of activations ``a[n, c, h, w] > 0`` over all inputs and positions,
    and the fraction of channels (or units) that are 0 for every input and position. Runs in eval
    mode on the model's device; the model's mode is restored. Raises ValueError for a model without
    ``nn.ReLU`` modules (the 2-layer nets and the WRN apply ``torch.relu`` functionally)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU modules (a functional relu is invisible to hooks)")
    dev = next(model.parameters()).device
    pos = [0.0] * len(relus)
    total = [0] * len(relus)
    alive = [None] * len(relus)
    current = {}

    def hook(i):
        def fn(module, inputs, output):
            o = output.float()
            pos[i] += float((o > 0).sum())
            total[i] += o.numel()
            fired = (o > 0).flatten(2).any(2).any(0) if o.dim() > 2 else (o > 0).any(0)
            alive[i] = fired if alive[i] is None else (alive[i] | fired)
            current[i] = True

        return fn

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(relus)]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(x), batch_size):
            model(x[s : s + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        "active_fraction": [p / t for p, t in zip(pos, total)],
        "dead_channels": [1.0 - float(a.float().mean()) for a in alive],
    }
