"""The CUDA path of the training loop: bf16 autocast, channels_last, GPU-resident data, resume.
Skipped without a GPU; run them on one with `pytest tests/test_cuda.py`."""

import pytest
import torch

from common import models as M
from common.data import DeviceLoader, fake_cifar10, standardized
from common.train import evaluate, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def small():
    d = fake_cifar10(512, seed=0)
    x, xt = standardized(d)
    return x, d.y_train, xt, d.y_test


def test_loader_keeps_data_on_the_gpu_in_channels_last(small):
    x, y, _, _ = small
    loader = DeviceLoader(x, y, 64, CUDA, seed=0)
    xb, yb = loader.next_batch()
    assert xb.is_cuda and yb.is_cuda and xb.is_contiguous(memory_format=torch.channels_last)
    state = loader.state_dict()
    assert state["gen"].device.type == "cpu"  # generator states are CPU ByteTensors
    loader.load_state_dict(state)


def test_bf16_training_lowers_the_loss(small):
    x, y, xt, yt = small
    model = M.two_layer_cnn(filters=16, hidden=32, seed=0)
    loss0, _ = evaluate(model.to(CUDA), x, y)
    hist = train(
        model,
        x,
        y,
        steps=150,
        lr=0.01,
        batch_size=64,
        eval_sets={"train": (x, y), "test": (xt, yt)},
        eval_every=50,
        dev=CUDA,
    )
    assert next(model.parameters()).is_cuda
    assert hist["eval"]["train_loss"][-1] < 0.7 * loss0


def test_resume_on_cuda_gives_the_same_history(small, tmp_path):
    x, y, _, _ = small
    kw = dict(steps=30, lr=0.05, batch_size=32, data_seed=1, log_every=5, dev=CUDA)
    ref = M.two_layer_cnn(filters=8, hidden=16, seed=0)
    ref_hist = train(ref, x, y, **kw)

    class Interrupt(Exception):
        pass

    def crash(model, step):
        if step == 17:
            raise Interrupt
        return {}

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Interrupt):
        train(
            M.two_layer_cnn(filters=8, hidden=16, seed=0),
            x,
            y,
            callbacks=[(17, crash)],
            checkpoint_path=ckpt,
            checkpoint_every=10,
            **kw,
        )
    resumed = M.two_layer_cnn(filters=8, hidden=16, seed=42)
    hist = train(resumed, x, y, checkpoint_path=ckpt, checkpoint_every=10, **kw)
    # same batches and same state: equal up to the GPU's non-deterministic rounding
    assert hist["train"]["step"] == ref_hist["train"]["step"]
    assert max(abs(a - b) for a, b in zip(hist["train"]["loss"], ref_hist["train"]["loss"])) < 1e-2
