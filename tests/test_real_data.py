"""A first result on the real CIFAR-10 (skipped without it): the pieces fit together."""

import pytest
import torch

from common import alignment as A
from common import models as M
from common.data import random_labels, standardized
from common.train import train

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def x_std(cifar):
    return standardized(cifar)[0]


def test_top_patch_eigenvalue(x_std):
    # 20.95 measured on the first 10k standardised training images (docs/protocol.md, "Data")
    lam, V = A.eigh_desc(A.patch_covariance(x_std[:10_000], 3))
    assert abs(lam[0].item() - 20.8) < 0.5
    dc = torch.ones(27, dtype=torch.float64) / 27**0.5
    assert abs(V[:, 0] @ dc) > 0.95  # the top direction is the mean (DC) luminance patch
    assert lam[-1] > 0


def test_random_label_training_aligns_first_layer(x_std):
    n = 2000
    x = x_std[:n]
    y = random_labels(n, 10, seed=1)
    _, V = A.eigh_desc(A.patch_covariance(x, 3))
    R = A.random_orthonormal_basis(27, seed=0)
    model = M.two_layer_cnn(first_layer_std=0.002, seed=0)

    def cb(m, step):
        C = A.weight_covariance(A.filter_matrix(m.conv))
        return {"M_data": A.misalignment(C, V), "M_rand": A.misalignment(C, R)}

    hist = train(model, x, y, steps=50, lr=0.01, batch_size=128, callbacks=[(50, cb)], dev=torch.device("cpu"))
    m_data, m_rand = hist["callbacks"]["M_data"], hist["callbacks"]["M_rand"]
    print(f"M(data eigvecs) {m_data}, M(random basis) {m_rand}")
    assert m_data[0] < 2.5 and m_rand[0] < 2.5  # both at the finite-sample floor (~1.5) at init
    assert m_rand[-1] > 5 * m_data[-1]
    assert m_rand[-1] > 4 * m_rand[0]
