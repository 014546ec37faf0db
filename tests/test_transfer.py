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


class _TwoConvStack(torch.nn.Module):
    """conv 3x3 (3 -> 4, padding 1), ReLU, max-pool 2, conv 3x3 (4 -> ``m2``, padding 1): a feature stack with a
    second layer wide enough to check the covariance of its sampled filters by Monte Carlo."""

    def __init__(self, m2):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, m2, 3))


def _np_block_output(x, w, b):
    """Hand-written reference of conv 3x3 (padding 1) + bias, ReLU, max-pool 2: ``x (n, c, h, w)`` -> numpy."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = np.einsum("ncab,ocab->no", xp[:, :, i : i + 3, j : j + 3], w) + b
    out = np.maximum(out, 0)
    return out.reshape(n, w.shape[0], h // 2, 2, wd // 2, 2).max(axis=(3, 5))


def _np_patch_eigvecs(a):
    """Eigenvectors (columns, largest eigenvalue first) of the centred covariance of every valid 3 x 3 patch of
    ``a (n, c, h, w)``, each patch flattened in (c, kh, kw) order, by hand loops."""
    n, c, h, w = a.shape
    rows = [a[:, :, i : i + 3, j : j + 3].reshape(n, -1) for i in range(h - 2) for j in range(w - 2)]
    vals, vecs = np.linalg.eigh(np.cov(np.concatenate(rows), rowvar=False, bias=True))
    assert vals[0] > 1e-8 * vals[-1], "degenerate eigenvalues: the reference would be ambiguous"
    return vecs[:, ::-1]


def test_layerwise_transfer_second_layer_matches_a_numpy_reference():
    """Layer 2: tau from the pretrained filters against the pretrained network's own post-ReLU, post-pool inputs,
    mapped rank by rank onto the eigenvectors of the new network's inputs (through its re-sampled layer 1): the
    sampled filters' second moment is sum_i tau_i^2 v_i^N v_i^N^T, recomputed here in numpy (Monte Carlo)."""
    torch.manual_seed(0)
    probe = torch.randn(150, 3, 8, 8, dtype=torch.float64)
    probe[:, 1] += 0.7 * probe[:, 0]
    P, N = _TwoConvStack(16).double(), _TwoConvStack(40_000).double()
    with torch.no_grad():
        P.features[0].bias.fill_(0.2)  # every unit fires on some patches: no degenerate directions
        P.features[3].weight.mul_(torch.linspace(0.2, 3.0, 36, dtype=torch.float64).reshape(1, 4, 3, 3))
    T.layerwise_covariance_transfer(P, N, probe, 2, torch.Generator().manual_seed(0), rescale=False)

    x = probe.numpy()
    w1p, b1p = P.features[0].weight.detach().numpy(), P.features[0].bias.detach().numpy()
    v_p = _np_patch_eigvecs(_np_block_output(x, w1p, b1p))
    w2p = P.features[3].weight.detach().numpy().reshape(16, -1)
    tau2 = np.einsum("di,de,ei->i", v_p, w2p.T @ w2p / 16, v_p)
    w1n, b1n = N.features[0].weight.detach().numpy(), N.features[0].bias.detach().numpy()
    assert not b1n.any() and not N.features[3].bias.detach().numpy().any()
    v_n = _np_patch_eigvecs(_np_block_output(x, w1n, b1n))
    target = (v_n * tau2) @ v_n.T
    w2n = N.features[3].weight.detach().numpy().reshape(40_000, -1)
    assert np.abs(w2n.T @ w2n / 40_000 - target).max() < 0.03 * np.abs(target).max()
    # the mapping matters: the target built on the pretrained network's own eigenvectors is another matrix
    assert np.abs((v_p * tau2) @ v_p.T - target).max() > 0.2 * np.abs(target).max()


class _Upstream:
    """Stands in for a cached upstream run: its states and its cache hash."""

    def __init__(self, init, trained):
        self.states, self.hash = {"init": init, "trained": trained}, "0123456789abcdef"


def _vgg_upstream():
    init = M.vgg16(width=0.125, seed=0).state_dict()
    trained = _trained_like(M.vgg16(width=0.125, seed=0), seed=1).state_dict()
    return _Upstream({k: v.clone() for k, v in init.items()}, trained)


def test_layer_variant_pretrained_copies_the_first_layers_rescaled_and_nothing_else():
    up = _vgg_upstream()
    fresh = M.vgg16(width=0.125, seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    T.LayerVariant("pretrained", 3, up, seed=0).apply(fresh)
    after = fresh.state_dict()
    for i in (0, 2, 5):  # the first three conv layers
        w, src, ref = after[f"features.{i}.weight"], up.states["trained"][f"features.{i}.weight"], up.states["init"]
        assert torch.allclose(w, src * ref[f"features.{i}.weight"].norm() / src.norm(), rtol=1e-5, atol=0)
        assert not after[f"features.{i}.bias"].any()
    for k in before:
        if not any(k.startswith(f"features.{i}.") for i in (0, 2, 5)):
            assert torch.equal(after[k], before[k]), k


def test_layer_variant_covariance_samples_from_the_rescaled_bias_free_upstream_network():
    up = _vgg_upstream()
    probe = torch.randn(20, 3, 16, 16)
    fresh = M.vgg16(width=0.125, seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    T.LayerVariant("covariance", 2, up, seed=3, probe_images=probe).apply(fresh)
    # by hand: the upstream network with its first two conv layers rescaled to their initial norms, biases 0
    P = M.vgg16(width=0.125, seed=9)
    P.load_state_dict(up.states["trained"])
    T.rescale_to_reference(P, up.states["init"], ["features.0", "features.2"], bias="zero")
    ref = M.vgg16(width=0.125, seed=5)
    T.layerwise_covariance_transfer(P, ref, probe, 2, torch.Generator().manual_seed(40_003))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
        if not k.startswith(("features.0.", "features.2.")):
            assert torch.equal(v, before[k]), k
    assert not torch.equal(fresh.features[2].weight, before["features.2.weight"])


def test_layer_variant_keys_and_errors():
    up = _vgg_upstream()
    probe = torch.randn(4, 3, 8, 8)
    cov = T.LayerVariant("covariance", 2, up, seed=1, probe_images=probe).key()
    assert cov["upstream"] == up.hash and cov["n_layers"] == 2 and cov["probe"] is probe
    assert "probe" not in T.LayerVariant("pretrained", 2, up, seed=1).key()
    with pytest.raises(ValueError):
        T.LayerVariant("copy", 1, up, seed=0)
    with pytest.raises(ValueError):
        T.LayerVariant("covariance", 1, up, seed=0)  # no probe images
    with pytest.raises(ValueError):
        T.LayerVariant("pretrained", 14, up, seed=0).apply(M.vgg16(width=0.125, seed=0))  # VGG16 has 13


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
