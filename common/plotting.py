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


def tile_image(v, shape=(3, 5, 5), sign_ref=None):
    """One filter or eigenvector ``v (C*kh*kw,)`` in ``(C, kh, kw)`` order as an ``(kh, kw, C)`` RGB
    tile in [0, 1]: ``0.5 + v / (2 max|v|)`` (0 is mid-grey, the sign is kept). The sign is fixed so
    that ``v . sign_ref > 0`` when ``sign_ref`` is given, else so that the largest-magnitude entry
    is positive."""
    v = np.asarray(v, dtype=float)
    s = np.sign(v @ np.asarray(sign_ref, dtype=float)) if sign_ref is not None else np.sign(v[np.abs(v).argmax()])
    v = v * (s if s != 0 else 1.0)
    return (0.5 + v / (2 * np.abs(v).max())).reshape(shape).transpose(1, 2, 0)


def tile_grid(fig, spec, vectors, ncols, title, sign_refs=None, labels=None):
    """Draw ``vectors (n, d)`` as a grid of :func:`tile_image` tiles in the gridspec cell ``spec``."""
    n = len(vectors)
    nrows = int(np.ceil(n / ncols))
    sub = spec.subgridspec(nrows, ncols, wspace=0.08, hspace=0.25 if labels is not None else 0.08)
    for i in range(n):
        ax = fig.add_subplot(sub[i // ncols, i % ncols])
        ax.imshow(tile_image(vectors[i], sign_ref=None if sign_refs is None else sign_refs[i]), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if labels is not None:
            ax.set_title(labels[i], fontsize=6, pad=2)
    pos = spec.get_position(fig)
    fig.text(pos.x0, pos.y1 + 0.03, title, ha="left", va="bottom", fontsize=10)
