"""Patch covariance, weight covariance, misalignment and the eigenvalue mapping f (docs/protocol.md, "Formulas").

One flattening order everywhere: ``(C, kh, kw)``, the order of ``conv.weight.reshape(m, -1)`` and
of ``F.unfold``. All linear algebra is float64 and uses ``eigh`` (never ``eig``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def extract_patches(images: torch.Tensor, k: int) -> torch.Tensor:
    """All valid stride-1 ``k x k`` patches.

    ``images (N, C, H, W)`` -> ``(N * (H-k+1) * (W-k+1), C*k*k)`` in the input dtype, rows ordered
    by image, then patch row, then patch column; columns in ``(C, kh, kw)`` order.
    """
    n, c, h, w = images.shape
    cols = F.unfold(images, k)  # (N, C*k*k, L)
    return cols.transpose(1, 2).reshape(-1, c * k * k)


@torch.no_grad()
def patch_covariance(
    images: torch.Tensor, k: int, centered: bool = True, chunk: int = 1000, device=None
) -> torch.Tensor:
    """Covariance of all valid stride-1 ``k x k`` patches (docs/protocol.md, "Patch covariance").

    ``images (N, C, H, W)`` (any float or uint8 dtype; pass the *preprocessed* images) ->
    ``(d, d) float64`` on the CPU, ``d = C*k*k``. Streams ``chunk`` images at a time, summing
    ``sum p`` and ``sum p p^T`` in float64, so 50k images fit in memory. ``centered=False`` gives
    the second moment ``E[p p^T]``. ``device`` (default: the images' device) runs the sums there.
    """
    device = images.device if device is None else torch.device(device)
    c = images.shape[1]
    d = c * k * k
    s1 = torch.zeros(d, dtype=torch.float64, device=device)
    s2 = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = 0
    for start in range(0, images.shape[0], chunk):
        p = extract_patches(images[start : start + chunk].to(device, torch.float64), k)
        s1 += p.sum(0)
        s2 += p.T @ p
        count += p.shape[0]
    mean = s1 / count
    cov = s2 / count
    if centered:
        cov = cov - torch.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    return cov.cpu()


def eigh_desc(S) -> tuple:
    """Eigen-decomposition of a symmetric ``(d, d)`` matrix, largest eigenvalue first.

    Returns ``(eigenvalues (d,) float64, eigenvectors (d, d) float64)``, eigenvectors as columns.
    """
    S = torch.as_tensor(S, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(0.5 * (S + S.T))
    return vals.flip(0), vecs.flip(1)


def filter_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's filters as rows: ``(m, d) float64`` (Conv2d: ``d = C_in*kh*kw`` in
    ``(C, kh, kw)`` order; Linear: ``d = in_features``)."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1).to(torch.float64).cpu()


def weight_covariance(W: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Covariance of the rows of ``W (m, d)``: ``(d, d) float64``. Centred uses ``1/(m-1)``
    (as ``np.cov``, docs/protocol.md, "Weight covariance", estimator C); uncentred is :func:`second_moment`."""
    W = torch.as_tensor(W, dtype=torch.float64)
    if not centered:
        return second_moment(W)
    Wc = W - W.mean(0, keepdim=True)
    return Wc.T @ Wc / (W.shape[0] - 1)


def second_moment(W: torch.Tensor) -> torch.Tensor:
    """``W^T W / m`` for ``W (m, d)``: ``(d, d) float64`` (docs/protocol.md, "Weight covariance", estimator S)."""
    W = torch.as_tensor(W, dtype=torch.float64)
    return W.T @ W / W.shape[0]


def misalignment(sigma_w, basis, ridge: Optional[float] = None, max_cond: float = 1e12) -> float:
    """Misalignment of ``sigma_w (d, d)`` with the orthonormal columns of ``basis (d, d)``
    (docs/protocol.md, "Misalignment"; the paper's Appendix A.6):

        M = sum_i [ sqrt((b_i^T S b_i) (b_i^T S^{-1} b_i)) - 1 ]

    Zero exactly when ``sigma_w`` is diagonal in ``basis``; invariant to ``sigma_w -> c sigma_w``.
    A singular or ill-conditioned ``sigma_w`` (condition number above ``max_cond``) raises
    ``ValueError`` unless ``ridge`` is given, in which case ``sigma_w + ridge * tr(sigma_w)/d * I``
    is used. Returns a Python float.
    """
    S = torch.as_tensor(sigma_w, dtype=torch.float64)
    B = torch.as_tensor(basis, dtype=torch.float64)
    S = 0.5 * (S + S.T)
    d = S.shape[0]
    if ridge is not None:
        S = S + ridge * torch.trace(S) / d * torch.eye(d, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(S)
    if vals[0] <= 0 or vals[-1] / vals[0] > max_cond:
        raise ValueError(
            f"misalignment: sigma_w is singular or ill-conditioned (eigenvalues in "
            f"[{vals[0].item():.3g}, {vals[-1].item():.3g}]); estimate it from at least d = {d} "
            f"filters (pool runs) or pass ridge=1e-3"
        )
    proj = vecs.T @ B  # (d, d): coordinates of each b_i in S's eigenbasis
    q = (vals[:, None] * proj**2).sum(0)
    q_inv = (proj**2 / vals[:, None]).sum(0)
    return float((torch.sqrt(q * q_inv) - 1.0).clamp_min(0).sum())


def transfer_function(sigma_w, data_evecs) -> torch.Tensor:
    """Eigenvalue mapping f (the paper's Definition 3; docs/protocol.md, "Eigenvalue mapping"):
    ``f_i = sqrt(v_i^T sigma_w v_i)`` for the
    columns ``v_i`` of ``data_evecs (d, d)``. Returns ``(d,) float64``, the std of the filters
    along each data direction."""
    S = torch.as_tensor(sigma_w, dtype=torch.float64)
    V = torch.as_tensor(data_evecs, dtype=torch.float64)
    return torch.sqrt(((V.T @ S) * V.T).sum(1).clamp_min(0))


def random_orthonormal_basis(d: int, seed: int) -> torch.Tensor:
    """A Haar-distributed orthogonal ``(d, d) float64`` matrix: QR of a Gaussian matrix with the
    signs of R's diagonal moved into Q (Mezzadri 2007)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(d, d, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(Z)
    return Q * torch.sign(torch.diagonal(R))[None, :]


def misalignment_floor(m: int, d: int, n_draws: int = 200, centered: bool = True, seed: int = 0) -> float:
    """Expected misalignment of the covariance of ``m`` isotropic Gaussian filters in ``d``
    dimensions against a fixed basis (Monte-Carlo over ``n_draws``): the finite-sample floor of
    docs/protocol.md, "Misalignment" (about 1.50 for m = 256, d = 27). By rotation invariance the
    basis is the identity."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_draws, m, d, generator=g, dtype=torch.float64)
    if centered:
        W = W - W.mean(1, keepdim=True)
    S = W.transpose(1, 2) @ W / (m - 1 if centered else m)
    diag = torch.diagonal(S, dim1=1, dim2=2)
    diag_inv = torch.diagonal(torch.linalg.inv(S), dim1=1, dim2=2)
    return float((torch.sqrt(diag * diag_inv) - 1).sum(1).mean())


def theoretical_floor(m: int, d: int) -> float:
    """Large-m approximation of the floor, ``d (sqrt(m/(m-d-1)) - 1)`` (docs/protocol.md, "Misalignment")."""
    return d * (math.sqrt(m / (m - d - 1)) - 1)


def aligned_part(sigma_w, data_evecs) -> torch.Tensor:
    """``sum_i f_i^2 v_i v_i^T``: the part of ``sigma_w (d, d)`` that is diagonal in the data
    eigenbasis ``(d, d)`` ("aligned-only", docs/protocol.md, "Gaussian approximation"). ``(d, d) float64``."""
    V = torch.as_tensor(data_evecs, dtype=torch.float64)
    f = transfer_function(sigma_w, V)
    return (V * f**2) @ V.T


def match_eigenvectors(sigma_w, data_evecs, k: int = 10) -> dict:
    """For each of the top-``k`` eigenvectors u_j of ``sigma_w (d, d)`` (largest eigenvalue first),
    the data eigenvector it is closest to (Figure 3's quantitative companion).

    ``data_evecs (d, d)``: the data eigenvectors as columns, largest eigenvalue first. Returns
    ``{"w_evals": (k,), "w_evecs": (d, k), "data_index": (k,) int64, "abs_cos": (k,) float64}``:
    ``data_index[j] = argmax_i |u_j . v_i|`` (0 = the data's top direction) and ``abs_cos[j]`` that
    maximum. The order of ``data_index`` need not be 0, 1, 2, ...: f is not monotonic."""
    vals, vecs = eigh_desc(sigma_w)
    V = torch.as_tensor(data_evecs, dtype=torch.float64)
    cos = (V.T @ vecs[:, :k]).abs()  # (d, k)
    best, idx = cos.max(0)
    return {"w_evals": vals[:k], "w_evecs": vecs[:, :k], "data_index": idx, "abs_cos": best}


def matching_null(n_filters: int, d: int, k: int = 10, n_draws: int = 200, seed: int = 0) -> torch.Tensor:
    """Null distribution of :func:`match_eigenvectors`' ``abs_cos`` when the ``n_filters`` pooled
    filters are isotropic Gaussian (no alignment at all): ``(n_draws, k) float64``, the best |cos|
    of each of the top-``k`` eigenvectors of their second moment with a fixed orthonormal basis.
    By rotation invariance the basis can be the identity."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_draws, n_filters, d, generator=g, dtype=torch.float64)
    _, vecs = torch.linalg.eigh(W.transpose(1, 2) @ W / n_filters)  # ascending eigenvalues, batched
    top = vecs.flip(2)[:, :, :k]  # (n_draws, d, k), largest eigenvalue first
    return top.abs().max(1).values


def top_component_mass(W: torch.Tensor, data_evecs) -> torch.Tensor:
    """For each filter (row of ``W (m, d)``) the fraction of its squared norm along its largest data
    direction: ``max_i (v_i . w)^2 / |w|^2``, ``(m,) float64``. 1 for a filter that is one data
    eigenvector; about ``2 ln(d) / d`` for a random direction in d dimensions."""
    W = torch.as_tensor(W, dtype=torch.float64)
    V = torch.as_tensor(data_evecs, dtype=torch.float64)
    proj = (W @ V) ** 2
    return proj.max(1).values / proj.sum(1)


def misalignment_null(sigma_w, n_bases: int = 100, seed: int = 0) -> torch.Tensor:
    """What the anisotropy of ``sigma_w (d, d)`` alone gives: its misalignment against ``n_bases``
    Haar-random orthonormal bases (seeds ``seed, seed + 1, ...``), ``(n_bases,) float64``. An
    unaligned Σ_w with the same spectrum has M(data eigenvectors) distributed like this, so
    M(data) far below it separates alignment from mere anisotropy (Figure 2)."""
    S = torch.as_tensor(sigma_w, dtype=torch.float64)
    return torch.tensor([misalignment(S, random_orthonormal_basis(len(S), seed + i)) for i in range(n_bases)])


def transfer_function_change(S_end, S_start, data_evecs, start_var: float) -> torch.Tensor:
    """f read off what one run changed (Figure 20's estimator, docs/protocol.md "Eigenvalue mapping"):
    ``sqrt(start_var + v_i^T (S_end - S_start) v_i)`` for the columns ``v_i`` of ``data_evecs (d, d)``,
    with ``S_start``, ``S_end (d, d)`` the run's own first-layer second moments at initialisation and
    at the end and ``start_var`` the expected squared f at initialisation (init std squared). It
    replaces the run's sampled initial spread along ``v_i`` by its expectation, so independent seeds
    differ only by what training did. Negative values under the root are clipped to 0. ``(d,) float64``."""
    V = torch.as_tensor(data_evecs, dtype=torch.float64)
    D = torch.as_tensor(S_end, dtype=torch.float64) - torch.as_tensor(S_start, dtype=torch.float64)
    return torch.sqrt((start_var + ((V.T @ D) * V.T).sum(1)).clamp_min(0))


def seed_spread(f) -> float:
    """How far apart the seeds' curves are: ``max_i (max_s f[s, i] - min_s f[s, i]) / mean_s f[s, i]``
    for ``f (n_seeds, d)`` (Figure 20's agreement statistic)."""
    f = torch.as_tensor(f, dtype=torch.float64)
    return float(((f.max(0).values - f.min(0).values) / f.mean(0)).max())


def init_spread_null(m: int, d: int, n_seeds: int, n_draws: int = 200, seed: int = 0) -> torch.Tensor:
    """:func:`seed_spread` of the plain estimator f = sqrt(diag(W^T W / m)) when the ``n_seeds`` runs'
    first layers are independent isotropic Gaussian ``(m, d)`` draws and training changed nothing:
    ``(n_draws,) float64``, the spread that the initial weights alone give (scale-free)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_draws, n_seeds, m, d, generator=g, dtype=torch.float64)
    f = (W**2).mean(2).sqrt()  # (n_draws, n_seeds, d)
    return ((f.max(1).values - f.min(1).values) / f.mean(1)).max(1).values
