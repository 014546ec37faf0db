"""The stacked trainer: member i ends exactly where its own sequential run would (float64)."""

import pytest
import torch

from common import models as M
from common.data import fake_cifar10, standardized
from common.stacked import train_stacked
from common.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small():
    d = fake_cifar10(192, seed=0)
    x, _ = standardized(d)
    return x.double(), d.y_train


def _compare(models_seq, models_st, hists_seq, hists_st):
    for a, b in zip(models_seq, models_st):
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            assert torch.allclose(pa, pb, rtol=0, atol=1e-12 * max(1.0, pa.abs().max().item())), na
    for ha, hb in zip(hists_seq, hists_st):
        assert ha["train"]["step"] == hb["train"]["step"] and ha["eval"]["step"] == hb["eval"]["step"]
        for key in ("loss", "acc"):
            assert max(abs(u - v) for u, v in zip(ha["train"][key], hb["train"][key])) < 1e-12
        for key in ("train_acc", "train_loss"):
            assert max(abs(u - v) for u, v in zip(ha["eval"][key], hb["eval"][key])) < 1e-12
        assert ha["callbacks"]["step"] == hb["callbacks"]["step"]
        assert ha["callbacks"].get("h") == hb["callbacks"].get("h")
        assert max(abs(u - v) for u, v in zip(ha["callbacks"]["w"], hb["callbacks"]["w"])) < 1e-12


def _probe(model, step):
    return {"w": float(M.first_layer(model).weight.detach().double().norm())}


def test_stacked_cnn_members_match_their_sequential_runs(small):
    x, y = small
    make = [lambda s=s: M.two_layer_cnn(filters=6, hidden=8, first_layer_std=0.002, seed=s).double() for s in (0, 1, 2)]
    two = [(5, _probe), ([6], lambda m, s: {"h": s})]  # two probes: each step listed once
    kw = dict(steps=12, lr=0.05, momentum=0.9, batch_size=32, log_every=4, eval_every=6, callbacks=two)
    seq = [make[i]() for i in range(3)]
    hs = [
        train(m, x, y, data_seed=10 + i, dtype=torch.float64, dev=CPU, eval_sets={"train": (x, y)}, **kw)
        for i, m in enumerate(seq)
    ]
    st = [make[i]() for i in range(3)]
    ht = train_stacked(
        st, x, y, data_seeds=[10, 11, 12], dtype=torch.float64, dev=CPU, eval_sets={"train": (x, y)}, **kw
    )
    _compare(seq, st, hs, ht)
    assert not torch.equal(seq[0].conv.weight, seq[1].conv.weight)  # the members really differ


def test_stacked_fc_members_with_their_own_labels(small):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g, dtype=torch.float64)
    ys = [torch.randint(10, (200,), generator=g) for _ in range(2)]
    make = [lambda s=s: M.two_layer_fc(10, 32, 16, init_scale=2**-0.5, seed=s).double() for s in (3, 4)]
    kw = dict(
        steps=15,
        lr=0.05,
        momentum=0.9,
        batch_size=50,
        log_every=5,
        eval_every=5,
        callbacks=[([7], _probe)],
        weight_decay=1e-3,
        schedule="step",
    )
    seq = [make[i]() for i in range(2)]
    hs = [
        train(m, x, ys[i], data_seed=i, dtype=torch.float64, dev=CPU, eval_sets={"train": (x, ys[i])}, **kw)
        for i, m in enumerate(seq)
    ]
    st = [make[i]() for i in range(2)]
    ht = train_stacked(st, x, ys, data_seeds=[0, 1], dtype=torch.float64, dev=CPU, eval_sets={"train": (x, ys)}, **kw)
    _compare(seq, st, hs, ht)


@pytest.mark.parametrize("ci", ["", "1"])
def test_stacked_progress_bar_outside_ci_only(ci, capfd, monkeypatch):
    monkeypatch.setenv("CI", ci)
    x = torch.randn(64, 10)
    y = torch.randint(10, (64,))
    nets = [M.two_layer_fc(10, 8, 8, seed=s) for s in (0, 1)]
    train_stacked(nets, x, y, data_seeds=[0, 1], steps=4, batch_size=16, log_every=2, dev=CPU, desc="chunk 0-1")
    err = capfd.readouterr().err
    assert ("chunk 0-1 x2" in err and "loss=" in err) == (not ci)
    assert ci == "" or err == ""


def test_stacking_refuses_other_networks():
    with pytest.raises(TypeError):
        train_stacked(
            [M.vgg16(width=0.0625)],
            torch.zeros(4, 3, 32, 32),
            torch.zeros(4, dtype=torch.long),
            data_seeds=[0],
            steps=1,
        )


def test_cached_train_many_stores_each_member_under_its_own_key(small, tmp_path, monkeypatch):
    from common.models import spec
    from common.train import cached_train, cached_train_many

    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    x, y = small
    specs = [spec("two_layer_cnn", filters=4, hidden=8, first_layer_std=0.002, seed=s) for s in range(3)]
    kw = dict(steps=6, lr=0.05, batch_size=32, dtype=torch.float64, log_every=3, dev=CPU)
    stacked = cached_train_many(
        [sp for sp in specs], x.float(), y, data_seeds=[0, 1, 2], stack=3, keep=["trained"], **kw
    )
    assert [r.source for r in stacked] == ["computed"] * 3
    again = cached_train(specs[1], x.float(), y, data_seed=1, keep=["trained"], **kw)  # the sequential call hits
    assert again.hit and again.hash == stacked[1].hash
    seq = cached_train(specs[1], x.float(), y, data_seed=1, keep=["trained"], force=True, **kw)
    for k, v in seq.states["trained"].items():
        assert torch.allclose(v, stacked[1].states["trained"][k], rtol=0, atol=1e-12)
    assert all(
        r.hit for r in cached_train_many(specs, x.float(), y, data_seeds=[0, 1, 2], stack=3, keep=["trained"], **kw)
    )


def test_cached_train_many_with_inits_matches_sequential_transfer_runs(small, tmp_path, monkeypatch):
    """Per-member inits (Figure 5's transfer variants): each stacked member ends where its own
    cached_train(init=...) run does, in float64, and is stored under that run's key."""
    from common.models import spec
    from common.train import cached_train, cached_train_many
    from common.transfer import Variant

    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    x, y = small
    kw = dict(steps=6, lr=0.05, batch_size=32, dtype=torch.float64, log_every=3, dev=CPU)
    net = spec("two_layer_cnn", filters=4, hidden=8, first_layer_std=0.002, seed=0)
    up = cached_train(net, x.float(), y, keep=["init", "trained"], data_seed=0, **kw)
    names = [None, "pretrained", "covariance", "no rescaling", "pretrained + FC"]
    inits = [None if v is None else Variant(v, up, seed=3) for v in names]
    downs = [spec("two_layer_cnn", filters=4, hidden=8, first_layer_std=0.002, seed=100 + i) for i in range(len(names))]
    seeds = list(range(len(names)))
    y2 = y.flip(0)
    many = cached_train_many(
        downs, x.float(), y2, data_seeds=seeds, inits=inits, stack=5, keep=["init", "trained"], **kw
    )
    assert [r.source for r in many] == ["computed"] * len(names)
    for i, (sp, init) in enumerate(zip(downs, inits)):
        seq = cached_train(sp, x.float(), y2, init=init, data_seed=i, keep=["init", "trained"], force=True, **kw)
        assert seq.hash == many[i].hash
        for which in ("init", "trained"):
            for k, v in seq.states[which].items():
                assert torch.allclose(v, many[i].states[which][k], rtol=0, atol=1e-12), (names[i], which, k)
        for a, b in zip(seq.history["train"]["loss"], many[i].history["train"]["loss"]):
            assert a == pytest.approx(b, abs=1e-12)
    with pytest.raises(ValueError, match="one init"):
        cached_train_many(downs, x.float(), y2, data_seeds=seeds, inits=inits[:2], stack=5, **kw)
