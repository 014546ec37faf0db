import numpy as np
import pytest
import torch

from common import alignment as A
from common import models as M
from common import transfer as T


def _trained_like(model, seed=0):
    """Perturb every parameter (weights grow, biases become non-zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("bias", ["zero", "keep", "scale"])
def test_rescale_to_reference_restores_norms(bias):
    model = M.two_layer_cnn(filters=8, hidden=16, seed=0)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    _trained_like(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factors = T.rescale_to_reference(model, ref, bias=bias)
    for name in ["conv", "fc", "head"]:
        w = model.get_submodule(name).weight
        assert torch.isclose(w.norm(), ref[f"{name}.weight"].norm(), rtol=1e-6)
        assert np.isclose(factors[name], (ref[f"{name}.weight"].norm() / before[f"{name}.weight"].norm()).item())
        b = model.get_submodule(name).bias
        expect = {
            "zero": torch.zeros_like(b),
            "keep": before[f"{name}.bias"],
            "scale": before[f"{name}.bias"] * factors[name],
        }[bias]
        assert torch.allclose(b, expect)
    with pytest.raises(ValueError):
        T.rescale_to_reference(model, ref, bias="drop")


def test_rescale_only_named_layers():
    model = M.two_layer_cnn(filters=8, hidden=16, seed=0)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    _trained_like(model)
    fc_before = model.fc.weight.clone()
    T.rescale_to_reference(model, ref, layers=["conv"])
    assert torch.isclose(model.conv.weight.norm(), ref["conv.weight"].norm())
    assert torch.equal(model.fc.weight, fc_before)


@pytest.mark.parametrize("centered", [False, True])
def test_gaussian_resample_covariance_matches(centered):
    g = torch.Generator().manual_seed(0)
    d = 6
    B = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = torch.randn(500, d, generator=g, dtype=torch.float64) @ B + (1.0 if centered else 0.0)
    new = T.gaussian_resample(W, 200_000, torch.Generator().manual_seed(1), centered=centered)
    assert new.shape == (200_000, d) and new.dtype == W.dtype
    if centered:
        target = np.cov(W.numpy(), rowvar=False)
        assert np.allclose(new.numpy().mean(0), W.numpy().mean(0), atol=0.05)
        got = np.cov(new.numpy(), rowvar=False)
    else:
        target = W.numpy().T @ W.numpy() / 500
        got = new.numpy().T @ new.numpy() / len(new)
    assert np.allclose(got, target, atol=0.03 * np.abs(target).max())


def test_gaussian_resample_of_rank_deficient_filters_stays_in_their_span():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 10, generator=g)  # rank 3 in 10 dims
    new = T.gaussian_resample(W, 50, g).double()
    Q, _ = torch.linalg.qr(W.double().T)
    resid = new.T - Q @ (Q.T @ new.T)
    assert resid.abs().max() < 1e-4 * new.abs().max()


def test_transplant_copies_and_rescales():
    src = _trained_like(M.two_layer_cnn(filters=8, hidden=16, seed=0))
    ref = M.two_layer_cnn(filters=8, hidden=16, seed=0).state_dict()
    dst = M.two_layer_cnn(filters=8, hidden=16, seed=9)
    fc_before = dst.fc.weight.clone()
    T.transplant(src, dst, ["conv"], reference_state=ref, bias="zero")
    cos = torch.nn.functional.cosine_similarity(dst.conv.weight.flatten(), src.conv.weight.flatten(), dim=0)
    assert cos > 0.999999 and torch.isclose(dst.conv.weight.norm(), ref["conv.weight"].norm())
    assert torch.count_nonzero(dst.conv.bias) == 0 and torch.equal(dst.fc.weight, fc_before)
    raw = M.two_layer_cnn(filters=8, hidden=16, seed=9)
    T.transplant(src, raw, ["conv", "fc"], bias="keep")
    assert torch.equal(raw.conv.weight, src.conv.weight) and torch.equal(raw.fc.bias, src.fc.bias)


def test_layerwise_transfer_first_layer_follows_data_eigenvector():
    probe = torch.randn(40, 3, 12, 12)
    probe[:, 1] += 0.8 * probe[:, 0]  # correlated channels: distinct eigenvalues
    lam, V = A.eigh_desc(A.patch_covariance(probe, 3))
    P = M.vgg16(width=0.125, seed=0)
    N = M.vgg16(width=0.125, seed=1)
    with torch.no_grad():  # every pretrained first-layer filter is a multiple of data eigenvector 4
        coef = torch.randn(P.features[0].out_channels, 1)
        P.features[0].weight.copy_((coef * V[:, 4].float()[None]).reshape(P.features[0].weight.shape))
    norm_before = N.features[0].weight.norm()
    info = T.layerwise_covariance_transfer(P, N, probe, n_layers=2, generator=torch.Generator().manual_seed(0))
    tau = info[0]["tau"]
    assert tau[4] > 0 and torch.all(tau[torch.arange(27) != 4] < 1e-6 * tau[4])
    Wn = A.filter_matrix(N.features[0])
    cos = (Wn @ V[:, 4]).abs() / Wn.norm(dim=1)
    assert torch.all(cos > 0.9999)  # every sampled filter is along the same data direction
    assert torch.isclose(N.features[0].weight.norm(), norm_before, rtol=1e-5)
    assert torch.count_nonzero(N.features[0].bias) == 0
    assert info[1]["tau"].shape == (N.features[2].weight[0].numel(),)


def test_layerwise_transfer_needs_feature_stack():
    with pytest.raises(TypeError):
        T.layerwise_covariance_transfer(
            M.two_layer_fc(4, 8, 8), M.two_layer_fc(4, 8, 8), torch.randn(5, 4), 1, torch.Generator()
        )


def test_covariance_init_matches_the_second_moment_monte_carlo():
    g = np.random.default_rng(0)
    src = g.normal(size=(64, 6)) @ g.normal(size=(6, 6))  # anisotropic "pretrained" filters
    target = src.T @ src / len(src)  # the uncentred second moment, computed independently in numpy
    layer = torch.nn.Linear(6, 100_000)
    with torch.no_grad():
        layer.bias.fill_(3.0)
    T.covariance_init(layer, torch.tensor(src), torch.Generator().manual_seed(1))
    W = layer.weight.detach().double().numpy()
    assert np.allclose(W.mean(0), 0, atol=0.02 * np.sqrt(np.diag(target)).max())  # mean 0
    assert np.allclose(W.T @ W / len(W), target, atol=0.02 * np.abs(target).max())
    assert torch.all(layer.bias == 0)


def test_random_eigenbasis_init_keeps_the_spectrum_but_not_the_eigenvectors():
    g = np.random.default_rng(1)
    vals = np.array([9.0, 4.0, 1.0, 0.25])
    src = g.normal(size=(400, 4)) * np.sqrt(vals)  # eigenvectors = coordinate axes
    layer = torch.nn.Linear(4, 200_000)
    T.random_eigenbasis_init(layer, torch.tensor(src), torch.Generator().manual_seed(2), basis_seed=3)
    W = layer.weight.detach().double().numpy()
    got_vals, got_vecs = np.linalg.eigh(W.T @ W / len(W))
    ref_vals = np.linalg.eigvalsh(src.T @ src / len(src))
    assert np.allclose(got_vals, ref_vals, rtol=0.03)
    assert np.abs(got_vecs).max(0).min() < 0.95  # some eigenvector is far from every axis


def test_variants_build_what_their_names_say():
    from common.cache import CachedResult

    net = M.two_layer_cnn(filters=8, hidden=16, seed=0)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    trained = _trained_like(net).state_dict()
    up = CachedResult({"parts": {}, "code": "x", "version": "0"}, {}, {"init": init, "trained": trained}, ".", "cache")

    def build(name):
        return T.Variant(name, up, seed=0).apply(M.two_layer_cnn(filters=8, hidden=16, seed=5))

    fresh = M.two_layer_cnn(filters=8, hidden=16, seed=5)
    pre = build("pretrained")
    assert torch.isclose(pre.conv.weight.norm(), init["conv.weight"].norm())
    assert torch.allclose(
        pre.conv.weight / pre.conv.weight.norm(), trained["conv.weight"] / trained["conv.weight"].norm()
    )
    assert torch.all(pre.conv.bias == 0) and torch.equal(pre.fc.weight, fresh.fc.weight)
    nr = build("no rescaling")
    assert torch.equal(nr.conv.weight, trained["conv.weight"]) and torch.equal(nr.conv.bias, trained["conv.bias"])
    kept = build("pretrained, bias kept")
    assert torch.equal(kept.conv.bias, trained["conv.bias"])
    both = build("pretrained + FC")
    assert torch.isclose(both.fc.weight.norm(), init["fc.weight"].norm()) and torch.equal(
        both.head.weight, fresh.head.weight
    )
    cov = build("covariance")
    assert not torch.allclose(cov.conv.weight, pre.conv.weight) and torch.all(cov.conv.bias == 0)
    assert torch.equal(cov.fc.weight, fresh.fc.weight)
    assert T.Variant("covariance", up, 0).key() == {"variant": "covariance", "seed": 0, "upstream": up.hash}
    with pytest.raises(ValueError):
        T.Variant("from scratch", up, 0)


def test_all_but_head_variants_on_vgg():
    net = M.vgg16(width=0.125, num_classes=50, seed=0)  # upstream head: 50 random classes
    init = {k: v.clone() for k, v in net.state_dict().items()}
    trained = _trained_like(net).state_dict()
    from common.cache import CachedResult

    up = CachedResult({"parts": {}, "code": "x", "version": "0"}, {}, {"init": init, "trained": trained}, ".", "cache")
    fresh = M.vgg16(width=0.125, seed=3)
    raw = T.Variant("all but head", up, 0).apply(M.vgg16(width=0.125, seed=3))
    res = T.Variant("all but head, rescaled", up, 0).apply(M.vgg16(width=0.125, seed=3))
    for name in T.weight_layers(fresh):
        if name == "head":
            assert torch.equal(raw.head.weight, fresh.head.weight) and torch.equal(res.head.weight, fresh.head.weight)
            continue
        w_raw, w_res = raw.get_submodule(name), res.get_submodule(name)
        assert torch.equal(w_raw.weight, trained[f"{name}.weight"]) and torch.equal(w_raw.bias, trained[f"{name}.bias"])
        assert torch.isclose(w_res.weight.norm(), init[f"{name}.weight"].norm()) and torch.all(w_res.bias == 0)
