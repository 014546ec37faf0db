import json
import math

import pytest
import torch

from common import models as M
from common.data import fake_cifar10, standardized
from common.train import evaluate, lr_at, train


def test_lr_schedules():
    assert lr_at(500, 900, 0.1) == 0.1
    assert lr_at(299, 900, 0.1, "step") == pytest.approx(0.1)
    assert lr_at(300, 900, 0.1, "step") == pytest.approx(0.1 / 3)
    assert lr_at(600, 900, 0.1, "step") == pytest.approx(0.1 / 9)
    assert lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(100, 100, 0.1, "cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError):
        lr_at(0, 1, 0.1, "linear")


@pytest.fixture(scope="module")
def small():
    d = fake_cifar10(256, seed=0)
    x, xt = standardized(d)
    return x, d.y_train, xt, d.y_test


def _model(seed=0):
    return M.two_layer_cnn(filters=8, hidden=16, seed=seed)


def test_training_lowers_the_loss_and_history_is_json(small):
    x, y, xt, yt = small
    model = _model()
    loss0, _ = evaluate(model, x, y)
    hist = train(
        model,
        x,
        y,
        steps=120,
        lr=0.01,
        batch_size=64,
        eval_sets={"train": (x, y), "test": (xt, yt)},
        eval_every=40,
        log_every=10,
        dev=torch.device("cpu"),
    )
    loss1, acc1 = evaluate(model, x, y)
    assert loss1 < 0.5 * loss0
    assert hist["eval"]["step"] == [0, 40, 80, 120]
    assert hist["eval"]["train_loss"][0] == pytest.approx(loss0)
    assert hist["eval"]["train_acc"][-1] == pytest.approx(acc1)
    assert hist["train"]["step"][-1] == 120 and hist["steps"] == 120
    json.dumps(hist)


def test_epoch_budget_and_callbacks(small):
    x, y, _, _ = small
    calls = []

    def cb(model, step):
        calls.append(step)
        return {"w_norm": model.conv.weight.norm().item()}

    hist = train(_model(), x, y, epochs=1.5, batch_size=100, callbacks=[(2, cb)], dev=torch.device("cpu"))
    assert hist["steps"] == math.ceil(1.5 * 256 / 100)  # 4
    assert calls == [0, 2, 4] and hist["callbacks"]["step"] == [0, 2, 4]
    assert len(hist["callbacks"]["w_norm"]) == 3
    listed = train(
        _model(),
        x,
        y,
        steps=7,
        batch_size=100,
        dev=torch.device("cpu"),
        callbacks=[([3, 5], lambda m, s: {"v": [s, 2 * s]})],
    )
    assert listed["callbacks"]["step"] == [0, 3, 5, 7] and listed["callbacks"]["v"][1] == [3.0, 6.0]
    both = train(  # two probes: each step is listed once; each probe's values at its own steps (0 and the end always)
        _model(),
        x,
        y,
        steps=4,
        batch_size=100,
        dev=torch.device("cpu"),
        callbacks=[(1, lambda m, s: {"a": s}), ([4], lambda m, s: {"b": s})],
    )
    assert both["callbacks"] == {"step": [0, 1, 2, 3, 4], "a": [0.0, 1.0, 2.0, 3.0, 4.0], "b": [0.0, 4.0]}


def test_cpu_training_is_deterministic(small):
    x, y, _, _ = small
    a, b = _model(), _model()
    train(a, x, y, steps=15, batch_size=32, data_seed=3, dev=torch.device("cpu"))
    train(b, x, y, steps=15, batch_size=32, data_seed=3, dev=torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = _model()
    train(c, x, y, steps=15, batch_size=32, data_seed=4, dev=torch.device("cpu"))
    assert not torch.equal(a.conv.weight, c.conv.weight)


def test_resume_after_interruption_gives_the_same_result(small, tmp_path):
    x, y, _, _ = small
    kw = dict(steps=30, lr=0.05, batch_size=32, data_seed=1, log_every=5, dev=torch.device("cpu"))
    ref = _model()
    ref_hist = train(ref, x, y, **kw)

    class Interrupt(Exception):
        pass

    def crash(model, step):
        if step == 17:
            raise Interrupt
        return {}

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Interrupt):
        train(_model(), x, y, callbacks=[(17, crash)], checkpoint_path=ckpt, checkpoint_every=10, **kw)
    assert ckpt.is_file()
    resumed = _model(seed=42)  # whatever the init: the checkpoint restores it
    hist = train(resumed, x, y, checkpoint_path=ckpt, checkpoint_every=10, **kw)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), resumed.parameters()))
    assert hist["train"] == ref_hist["train"]


def test_checkpoints_follow_wall_time_by_default(small, tmp_path):
    x, y, _, _ = small
    ckpt = tmp_path / "ckpt.pt"
    train(_model(), x, y, steps=5, batch_size=32, checkpoint_path=ckpt, dev=torch.device("cpu"))
    assert not ckpt.exists()  # a short run writes none (default: every 300 s)
    train(_model(), x, y, steps=5, batch_size=32, checkpoint_path=ckpt, checkpoint_every_s=0.0, dev=torch.device("cpu"))
    assert ckpt.is_file()
