import math

import pytest
import torch
from torch import nn

from common import models as M
from common.models import n_params


def test_parameter_counts():
    assert n_params(M.vgg16()) == 14_719_818
    assert n_params(M.two_layer_cnn()) == 14_753_482
    assert abs(n_params(M.wrn()) - 5.85e6) < 0.01e6
    assert n_params(M.two_layer_fc(30, 2048, 256)) == 30 * 2048 + 2048 + 2048 * 256 + 256 + 2570


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: M.vgg16(width=0.125), (4, 3, 32, 32)),
        (lambda: M.vgg16(width=0.125, late_width=2.0, num_classes=7), (4, 3, 32, 32)),
        (lambda: M.wrn(depth=10, widen=1), (4, 3, 32, 32)),
        (lambda: M.two_layer_cnn(filters=16, num_classes=5), (4, 3, 32, 32)),
        (lambda: M.two_layer_fc(10, 32, 16), (4, 10)),
    ],
)
def test_output_shapes(make, shape):
    model = make()
    out = model(torch.randn(shape))
    assert out.shape == (4, M.classifier(model).out_features)


def test_vgg_late_width_scales_blocks_4_and_5_only():
    convs = [m for m in M.vgg16(late_width=2.0).features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [1024] * 6
    assert M.classifier(M.vgg16(late_width=2.0)).in_features == 1024


def test_wrn_stem_keeps_32x32():
    model = M.wrn(stem_kernel=5)
    stem = M.first_layer(model)
    assert stem.kernel_size == (5, 5)
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32, 32)


def _std_ok(w, target):
    n = w.numel()
    # the sample std of n normals has relative sd ~ 1/sqrt(2n); allow 5 of those
    return abs(w.std().item() / target - 1) < 5 / math.sqrt(2 * n)


@pytest.mark.parametrize("init_scale", [1.0, 0.3])
def test_he_init_times_scale(init_scale):
    model = M.vgg16(width=0.5, init_scale=init_scale, seed=0)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            fan_in = mod.weight[0].numel()
            assert _std_ok(mod.weight, init_scale * math.sqrt(2 / fan_in))
            assert abs(mod.weight.mean().item()) < 5 * mod.weight.std().item() / math.sqrt(mod.weight.numel())
            assert torch.count_nonzero(mod.bias) == 0


def test_first_layer_std_overrides_only_the_first_layer():
    model = M.two_layer_cnn(first_layer_std=0.002, seed=1)
    assert _std_ok(model.conv.weight, 0.002)
    assert _std_ok(model.fc.weight, math.sqrt(2 / (256 * 30 * 30)))
    assert _std_ok(model.head.weight, math.sqrt(2 / 64))


def test_seed_makes_init_reproducible_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = M.two_layer_fc(10, 64, 32, seed=5)
    torch.manual_seed(1)
    b = M.two_layer_fc(10, 64, 32, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_replace_classifier_fresh_head_same_rule():
    model = M.two_layer_cnn(filters=8, init_scale=0.5)
    old = M.classifier(model)
    M.replace_classifier(model, 3, seed=0)
    new = M.classifier(model)
    assert new is not old and new.out_features == 3 and new.in_features == 64
    assert torch.count_nonzero(new.bias) == 0
    assert abs(new.weight.std().item() / (0.5 * math.sqrt(2 / 64)) - 1) < 0.35
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_relu_activity_against_a_hand_loop():
    from common.probes import relu_activity

    net = M.vgg16(width=0.125, seed=0)
    with torch.no_grad():
        net.features[0].bias.fill_(-0.3)  # make some units silent
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = relu_activity(net, x, batch_size=16)
    acts, h = [], x
    for mod in net.features:  # explicit forward, collecting every ReLU output
        h = mod(h)
        if isinstance(mod, torch.nn.ReLU):
            acts.append(h.detach())
    assert len(got["active_fraction"]) == len(acts) == 13
    for a, frac, dead in zip(acts, got["active_fraction"], got["dead_channels"]):
        assert abs(frac - (a > 0).float().mean().item()) < 1e-6
        per_channel = (a > 0).permute(1, 0, 2, 3).flatten(1).any(1)
        assert abs(dead - (1 - per_channel.float().mean().item())) < 1e-6


def test_relu_activity_probe_records_the_state_at_the_switch():
    """At step 0 of a run the probe sees the network as it starts (e.g. right after a transfer)."""
    from common.probes import ReluActivity, relu_activity
    from common.train import train

    net = M.vgg16(width=0.0625, num_classes=10, seed=1)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    want = relu_activity(net, x[:16])
    probe = ReluActivity(x[:16], every=[0])
    assert probe.key()["x"] is not None and probe.key()["every"] == [0]
    hist = train(net, x, y, steps=3, batch_size=16, lr=0.05, callbacks=[(probe.every, probe)], dev=torch.device("cpu"))
    assert hist["callbacks"]["step"] == [0, 3]
    assert hist["callbacks"]["active_fraction"][0] == pytest.approx(want["active_fraction"], abs=1e-12)
    assert hist["callbacks"]["dead_channels"][0] == pytest.approx(want["dead_channels"], abs=1e-12)


def test_relu_activity_refuses_a_network_with_functional_relus():
    from common.probes import relu_activity

    with pytest.raises(ValueError, match="no nn.ReLU"):
        relu_activity(M.two_layer_cnn(filters=8, hidden=8, seed=0), torch.randn(4, 3, 32, 32))
