"""Measurements taken during training (the callbacks of :func:`common.train.train`).

A probe is called as ``probe(model, step)`` and returns a dict of floats or lists of floats; its
``every`` says when (an int period or a list of steps) and its ``key()`` describes it completely
(tensors included), so the run cache knows when a stored history holds different measurements.
"""

from __future__ import annotations

from typing import Dict, Sequence, Union

import torch

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
