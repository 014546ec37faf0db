"""Small matplotlib helpers shared by the notebooks (paper-style curves with seed bands)."""

from __future__ import annotations

import numpy as np


def mean_band(ax, x, ys, label=None, color=None, ls="-", marker=None, alpha=0.2, **kw):
    """Plot the mean over seeds of ``ys (n_seeds, T)`` against ``x (T,)`` with a +-1 std band.

    Returns the line. A single seed draws the line alone.
    """
    ys = np.asarray(ys, dtype=float)
    ys = ys[None] if ys.ndim == 1 else ys
    mean = ys.mean(0)
    (line,) = ax.plot(x, mean, ls=ls, color=color, label=label, marker=marker, **kw)
    if ys.shape[0] > 1:
        std = ys.std(0)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=alpha, lw=0)
    return line


def style(ax, xlabel=None, ylabel=None, title=None, legend=True):
    """The paper's plain style: labels, light grid, legend."""
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False)
