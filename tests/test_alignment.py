import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import alignment as A


def test_extract_patches_matches_explicit_loop_and_conv_weight_order():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    k = 3
    P = A.extract_patches(x, k)
    rows = []
    for n in range(2):
        for r in range(5 - k + 1):
            for c in range(6 - k + 1):
                rows.append(x[n, :, r : r + k, c : c + k].reshape(-1))
    assert torch.allclose(P, torch.stack(rows))
    # a patch dotted with a flattened conv filter is the conv output at that position
    conv = nn.Conv2d(3, 4, k, bias=False).double()
    out = conv(x)  # (2, 4, 3, 4)
    via_patches = P @ conv.weight.reshape(4, -1).T
    assert torch.allclose(via_patches, out.permute(0, 2, 3, 1).reshape(-1, 4))


def test_extract_patches_matches_unfold():
    x = torch.randn(3, 3, 8, 8)
    u = F.unfold(x, 5)  # (N, 75, L)
    assert torch.equal(A.extract_patches(x, 5), u.transpose(1, 2).reshape(-1, 75))


@pytest.mark.parametrize("centered", [True, False])
def test_patch_covariance_matches_numpy(centered):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 6, 6)) + 0.5
    P = np.array([x[n, :, r : r + 3, c : c + 3].reshape(-1) for n in range(7) for r in range(4) for c in range(4)])
    if centered:
        ref = np.cov(P, rowvar=False, bias=True)
    else:
        ref = P.T @ P / len(P)
    got = A.patch_covariance(torch.tensor(x, dtype=torch.float32), 3, centered=centered, chunk=3)
    assert got.dtype == torch.float64 and got.shape == (27, 27)
    assert np.allclose(got.numpy(), ref, atol=1e-5)


def test_eigh_desc_orders_and_reconstructs():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(6, 6))
    S = B @ B.T
    vals, vecs = A.eigh_desc(S)
    assert np.all(np.diff(vals.numpy()) <= 0)
    assert np.allclose((vecs * vals) @ vecs.T, S)
    assert np.allclose(sorted(np.linalg.eigvalsh(S))[::-1], vals.numpy())


def test_filter_matrix_and_covariances():
    conv = nn.Conv2d(3, 40, 3)
    W = A.filter_matrix(conv)
    assert W.shape == (40, 27) and torch.equal(W, conv.weight.detach().reshape(40, -1).double())
    assert np.allclose(A.weight_covariance(W).numpy(), np.cov(W.numpy(), rowvar=False))
    assert np.allclose(A.second_moment(W).numpy(), W.numpy().T @ W.numpy() / 40)
    assert A.filter_matrix(nn.Linear(5, 7)).shape == (7, 5)


def _numpy_misalignment(S, B):
    Sinv = np.linalg.inv(S)
    return sum(math.sqrt((b @ S @ b) * (b @ Sinv @ b)) - 1 for b in B.T)


def test_misalignment_zero_when_aligned_and_positive_otherwise():
    d = 8
    B = A.random_orthonormal_basis(d, seed=0)
    S = (B * torch.linspace(0.1, 3, d, dtype=torch.float64)) @ B.T
    assert abs(A.misalignment(S, B)) < 1e-9
    R = A.random_orthonormal_basis(d, seed=1)
    m = A.misalignment(S, R)
    assert m > 0.1
    assert math.isclose(m, _numpy_misalignment(S.numpy(), R.numpy()), rel_tol=1e-9)


def test_misalignment_matches_numpy_and_is_scale_invariant():
    rng = np.random.default_rng(2)
    W = rng.normal(size=(100, 10)) @ rng.normal(size=(10, 10))
    S = np.cov(W, rowvar=False)
    B = A.random_orthonormal_basis(10, seed=3).numpy()
    ref = _numpy_misalignment(S, B)
    assert math.isclose(A.misalignment(S, B), ref, rel_tol=1e-9)
    assert math.isclose(A.misalignment(1e-4 * S, B), ref, rel_tol=1e-7)


def test_misalignment_rejects_singular_unless_ridge():
    W = torch.randn(5, 10, dtype=torch.float64)  # 5 filters in 10 dims: rank 5
    S = A.second_moment(W)
    B = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        A.misalignment(S, B)
    assert A.misalignment(S, B, ridge=1e-3) > 0


def test_transfer_function_reconstructs_aligned_sigma():
    V = A.random_orthonormal_basis(12, seed=4)
    f = torch.linspace(0.01, 0.5, 12, dtype=torch.float64)
    S = (V * f**2) @ V.T
    assert torch.allclose(A.transfer_function(S, V), f)
    assert torch.allclose(A.aligned_part(S, V), S)


def test_haar_basis_orthonormal_and_rotation_invariant():
    Q = A.random_orthonormal_basis(5, seed=0)
    assert torch.allclose(Q.T @ Q, torch.eye(5, dtype=torch.float64), atol=1e-12)
    # Haar: the first column is uniform on the sphere, so E[q_1 q_1^T] = I/d and
    # E[q_11^4] = 3 / (d (d + 2)); QR without the sign fix fails the first moment (q_11 < 0 biased)
    qs = torch.stack([A.random_orthonormal_basis(5, seed=s)[:, 0] for s in range(4000)])
    second = qs.T @ qs / len(qs)
    assert torch.allclose(second, torch.eye(5, dtype=torch.float64) / 5, atol=0.02)
    assert abs(qs[:, 0].mean().item()) < 0.03
    assert abs((qs[:, 0] ** 4).mean().item() - 3 / 35) < 0.01
    # a fixed rotation of Haar samples has the same law: compare a scalar statistic
    U = A.random_orthonormal_basis(5, seed=10_001)
    rot = qs @ U.T
    assert abs((rot[:, 2] ** 4).mean().item() - 3 / 35) < 0.01


def test_misalignment_floor_matches_simulation_and_table():
    floor = A.misalignment_floor(256, 27, n_draws=100)
    assert abs(floor - 1.50) < 0.08  # Monte-Carlo value (docs/protocol.md, "Misalignment")
    assert abs(floor - A.theoretical_floor(256, 27)) < 0.15
    # independent simulation: np.cov of isotropic filters against a random fixed basis
    rng = np.random.default_rng(5)
    B = A.random_orthonormal_basis(27, seed=6).numpy()
    sims = [_numpy_misalignment(np.cov(rng.normal(size=(256, 27)), rowvar=False), B) for _ in range(60)]
    assert abs(np.mean(sims) - floor) < 0.1


def test_match_eigenvectors_against_numpy():
    rng = np.random.default_rng(5)
    d = 8
    V, _ = np.linalg.qr(rng.normal(size=(d, d)))  # "data" eigenvectors
    perm = [3, 0, 5, 1, 2, 4, 6, 7]  # Sigma_w's top directions are data directions 3, 0, 5, ...
    S = sum((10.0 - i) * np.outer(V[:, p], V[:, p]) for i, p in enumerate(perm))
    out = A.match_eigenvectors(torch.tensor(S), torch.tensor(V), k=4)
    assert out["data_index"].tolist() == perm[:4]
    assert np.allclose(out["abs_cos"].numpy(), 1.0)
    # a loop reference on a generic matrix
    S2 = rng.normal(size=(d, d))
    S2 = S2 @ S2.T
    w, U = np.linalg.eigh(S2)
    U = U[:, ::-1]
    got = A.match_eigenvectors(torch.tensor(S2), torch.tensor(V), k=3)
    for j in range(3):
        cos = [abs(U[:, j] @ V[:, i]) for i in range(d)]
        assert got["data_index"][j] == int(np.argmax(cos)) and np.isclose(got["abs_cos"][j], max(cos))


def test_matching_null_is_the_max_coordinate_of_random_unit_vectors():
    null = A.matching_null(n_filters=300, d=75, k=3, n_draws=100, seed=0)
    rng = np.random.default_rng(1)  # independent reference: Haar-random unit vectors
    u = rng.normal(size=(20_000, 75))
    ref = np.abs(u / np.linalg.norm(u, axis=1, keepdims=True)).max(1)
    assert abs(null.mean().item() - ref.mean()) < 0.02
    assert abs(np.quantile(null.numpy(), 0.99) - np.quantile(ref, 0.99)) < 0.06


def test_top_component_mass():
    V = torch.eye(4, dtype=torch.float64)
    W = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(A.top_component_mass(W, V), torch.tensor([1.0, 0.25], dtype=torch.float64))


def test_misalignment_null_matches_rotated_copies_and_separates_alignment():
    d = 8
    evals = np.geomspace(10, 0.1, d)
    S = np.diag(evals)  # aligned with the identity: M(identity) = 0
    null = A.misalignment_null(S, n_bases=30, seed=5).numpy()
    for i in (0, 7, 29):  # independent reference: rotate S instead of the basis, numpy formula
        Q = A.random_orthonormal_basis(d, 5 + i).numpy()
        R = Q.T @ S @ Q
        Ri = np.linalg.inv(R)
        ref = np.sum(np.sqrt(np.diag(R) * np.diag(Ri)) - 1)
        assert null[i] == pytest.approx(ref, rel=1e-6)
    assert A.misalignment(torch.tensor(S), torch.eye(d, dtype=torch.float64)) < 1e-9 < null.min()
    iso = A.misalignment_null(np.eye(d) * 2.0, n_bases=5).numpy()
    assert np.abs(iso).max() < 1e-9


def test_transfer_function_change_removes_the_initial_draw():
    rng = np.random.default_rng(0)
    d, m, s0 = 6, 50, 0.3
    V = A.random_orthonormal_basis(d, 1).numpy()
    target = np.array([0.5, 0.2, 0.1, 0.05, 0.0, 0.0])  # added variance along each v_i
    out = []
    for _ in range(20):  # independent inits; training adds the same deterministic change
        W0 = rng.normal(0, s0, (m, d))
        S0 = W0.T @ W0 / m
        ST = S0 + (V * target) @ V.T
        f = A.transfer_function_change(ST, S0, V, s0**2).numpy()
        ref = [np.sqrt(s0**2 + V[:, i] @ (ST - S0) @ V[:, i]) for i in range(d)]  # hand loop
        np.testing.assert_allclose(f, ref, rtol=1e-12)
        out.append(f)
    np.testing.assert_allclose(np.array(out), np.sqrt(s0**2 + target)[None].repeat(20, 0), rtol=1e-9)
    raw = np.array(
        [A.transfer_function(A.second_moment(torch.tensor(rng.normal(0, s0, (m, d)))), V).numpy() for _ in range(20)]
    )
    assert raw.std(0).min() > 1e-3  # the plain estimator carries the initial draw
    assert A.transfer_function_change(np.zeros((d, d)), np.eye(d), V, 0.5).min() == 0  # clipped


def test_seed_spread_and_its_init_null():
    f = np.array([[1.0, 2.0], [1.1, 2.0], [0.9, 2.2]])
    assert A.seed_spread(f) == pytest.approx(0.2 / 1.0)
    null = A.init_spread_null(64, 5, 4, n_draws=300, seed=1).numpy()
    rng = np.random.default_rng(7)  # independent Monte-Carlo reference with numpy draws
    ref = []
    for _ in range(300):
        fs = np.array([np.sqrt((rng.normal(size=(64, 5)) ** 2).mean(0)) for _ in range(4)])
        ref.append(((fs.max(0) - fs.min(0)) / fs.mean(0)).max())
    assert null.mean() == pytest.approx(np.mean(ref), rel=0.05)
    assert 0.15 < null.mean() < 0.35  # about 2 * 2.06 * sqrt(1 / (2 * 64)) for the range of 4 draws, max over 5
