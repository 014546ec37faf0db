"""Training throughput of the engine (common.train) against two baselines, in images/s.

    python benchmarks/throughput.py [--models cnn fc vgg16 wrn] [--steps 10] [--batch 256]

- naive: fp32, NCHW, torch DataLoader over a uint8 Dataset with per-sample conversion and
  normalisation (what a straightforward PyTorch script does; 4 workers on CUDA, 0 on the CPU);
- bare: fp32 loop over index slices of the same pre-standardised tensors (CPU reference; the
  engine must be within 10% of it on the CPU);
- engine: common.train.train (on CUDA: GPU-resident data, bf16 autocast, channels_last).
Synthetic CIFAR-shaped data; steady state (warm-up steps are not timed).
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from common import models as M
from common.train import device, train

MODELS = {
    "cnn": lambda: M.two_layer_cnn(first_layer_std=0.002),
    "fc": lambda: M.two_layer_fc(3072, 2048, 256),
    "vgg16": lambda: M.vgg16(),
    "wrn": lambda: M.wrn(),
}


class PerSample(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
        self.mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
        self.std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i].float() / 255 - self.mean) / self.std, self.y[i]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def naive(make, x8, y, steps, warm, batch, dev):
    model = make().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    workers = 4 if dev.type == "cuda" else 0
    loader = DataLoader(
        PerSample(x8, y),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    it, done, t0 = iter(loader), 0, None
    while done < steps + warm:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if done == warm:
            _sync(dev)
            t0 = time.time()
        xb, yb = xb.to(dev), yb.to(dev)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    _sync(dev)
    return steps * batch / (time.time() - t0)


def bare(make, x, y, steps, warm, batch, dev):
    model = make().to(dev)
    x, y = x.to(dev), y.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for s in range(steps + warm):
        if s == warm:
            _sync(dev)
            t0 = time.time()
        idx = torch.randint(len(y), (batch,), generator=g).to(dev)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(dev)
    return steps * batch / (time.time() - t0)


def engine(make, x, y, steps, warm, batch, dev):
    model = make()
    train(model, x, y, steps=warm, batch_size=batch, dev=dev, desc="warm-up")
    _sync(dev)
    t0 = time.time()
    train(model, x, y, steps=steps, batch_size=batch, dev=dev, desc="engine", log_every=10**9)
    _sync(dev)
    return steps * batch / (time.time() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "fc"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=10_000, help="synthetic images")
    args = ap.parse_args()
    dev = device()
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(10, (args.n,), generator=g)
    x = (x8.float() / 255 - 0.47) / 0.25
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; {args.steps} timed steps")
    print(
        f"{'model':8} {'naive img/s':>12} {'bare img/s':>11} {'engine img/s':>13} "
        f"{'engine/naive':>13} {'engine/bare':>12}"
    )
    for key in args.models:
        make = MODELS[key]
        r_naive = naive(make, x8, y, args.steps, args.warm, args.batch, dev)
        r_bare = bare(make, x, y, args.steps, args.warm, args.batch, dev)
        r_eng = engine(make, x, y, args.steps, args.warm, args.batch, dev)
        print(
            f"{key:8} {r_naive:12.0f} {r_bare:11.0f} {r_eng:13.0f} {r_eng / r_naive:12.2f}x {r_eng / r_bare:11.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
