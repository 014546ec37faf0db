"""Training throughput of the engine (common.train) against two baselines, in images/s.

    python benchmarks/throughput.py [--models cnn fc vgg16 wrn] [--steps N] [--warm N] [--repeats 2]

- naive: fp32, NCHW, torch DataLoader over a uint8 Dataset with per-sample conversion and
  normalisation (what a straightforward PyTorch script does; 4 workers on CUDA, 0 on the CPU);
- bare: fp32 loop over index slices of the same pre-standardised tensors (CPU reference);
- engine: common.train.train (on CUDA: GPU-resident data, bf16 autocast, channels_last), timed
  from the end of the warm-up to the end of the run (model, optimiser and data setup excluded);
- stacked-N (2-layer CNN, FC): N members trained together by common.stacked.train_stacked, images/s
  summed over the members, for each N of ``--stack`` (a second table); stacked/engine is the per-run
  speed-up, the number that sizes the ``stack`` of the notebooks' GPU presets;
- protocol (2-layer CNN): the engine running Figure 2's protocol, misalignment probe every 10 steps
  and full-set evaluation every 100, so the cost of measurements is visible.
Synthetic CIFAR-shaped data; the same cuDNN settings for every path, and on the CPU the same malloc settings
(common.train.keep_freed_memory, set before the first path runs); each row is the mean of
``--repeats`` runs with the range below it.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from common import models as M
from common.probes import FirstLayerMisalignment
from common.stacked import train_stacked
from common.train import device, keep_freed_memory, train

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


def engine(make, x, y, steps, warm, batch, dev, probes=(), eval_every=None):
    """The engine; timed from the end of warm-up step ``warm`` to the end of the run (setup excluded).
    With ``probes`` / ``eval_every`` it times a notebook's protocol: training, probes and full-set
    evaluation together."""
    marks = {}

    def clock(model, step):
        _sync(dev)
        marks[step] = time.time()
        return {}

    train(
        make(),
        x,
        y,
        steps=warm + steps,
        batch_size=batch,
        dev=dev,
        desc="engine",
        log_every=50,
        callbacks=[([warm], clock), *[(p.every, p) for p in probes]],
        eval_sets={"train": (x, y)} if eval_every else None,
        eval_every=eval_every,
    )
    _sync(dev)
    return steps * batch / (time.time() - marks[warm])


def stacked(make, x, y, steps, warm, batch, dev, n):
    """``n`` members trained together by common.stacked.train_stacked: images/s summed over members."""
    marks = {}

    def clock(model, step):
        if step == warm and step not in marks:
            _sync(dev)
            marks[step] = time.time()
        return {}

    train_stacked(
        [make() for _ in range(n)],
        x,
        y,
        data_seeds=list(range(n)),
        steps=warm + steps,
        batch_size=batch,
        dev=dev,
        callbacks=[([warm], clock)],
        log_every=50,
    )
    _sync(dev)
    return n * steps * batch / (time.time() - marks[warm])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "fc"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 200 on CUDA, 20 on the CPU)")
    ap.add_argument("--warm", type=int, default=None, help="warm-up steps (default 20 on CUDA, 3 on the CPU)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=10_000, help="synthetic images")
    ap.add_argument(
        "--stack",
        type=int,
        nargs="+",
        default=None,
        help="members of the stacked rows, 2-layer CNN and FC (default 4 8 12 16 on CUDA, 4 on the CPU)",
    )
    args = ap.parse_args()
    t_start = time.time()
    took = {}  # section -> seconds of wall time, set-up and warm-up included (where the benchmark's time goes)
    dev = device()
    cuda = dev.type == "cuda"
    steps = args.steps or (200 if cuda else 20)
    warm = args.warm or (20 if cuda else 3)
    stacks = args.stack or ([4, 8, 12, 16] if cuda else [4])
    if cuda:
        torch.backends.cudnn.benchmark = True  # the same cuDNN setting for every path
    kept = None if cuda else keep_freed_memory()  # the engine sets it at its first run; every path gets it
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(10, (args.n,), generator=g)
    x = (x8.float() / 255 - 0.47) / 0.25
    name = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; batch {args.batch}; {warm} warm-up + {steps} timed steps; "
        f"{args.repeats} repeats (mean, and the range over repeats)"
        + ("" if kept is None else f"; malloc keeps freed memory: {kept}")
    )
    print(
        f"{'model':8} {'naive img/s':>12} {'bare img/s':>11} {'engine img/s':>13} {'engine/naive':>13} "
        f"{'engine/bare':>12} {'protocol img/s':>15}"
    )
    engine_mean = {}
    took["set-up"] = time.time() - t_start
    for key in args.models:
        t_section = time.time()
        make = MODELS[key]
        rows = []
        for _ in range(args.repeats):
            r = [
                naive(make, x8, y, steps, warm, args.batch, dev),
                bare(make, x, y, steps, warm, args.batch, dev),
                engine(make, x, y, steps, warm, args.batch, dev),
                float("nan"),
            ]
            if key == "cnn":  # Figure 2's protocol: misalignment every 10 steps, full-set evaluation every 100
                eye = torch.eye(27, dtype=torch.float64)
                probe = FirstLayerMisalignment({"data": eye, "random": eye.flip(1)}, every=10)
                r[3] = engine(make, x, y, steps, warm, args.batch, dev, probes=[probe], eval_every=100)
            rows.append(r)
        mean, spread = _mean_and_range(rows)
        engine_mean[key] = mean[2]
        protocol, protocol_range = (f"{mean[3]:.0f}", spread[3]) if key == "cnn" else ("-", "")  # timed for cnn only
        print(
            f"{key:8} {mean[0]:12.0f} {mean[1]:11.0f} {mean[2]:13.0f} {mean[2] / mean[0]:12.2f}x "
            f"{mean[2] / mean[1]:11.2f}x {protocol:>15}",
            flush=True,
        )
        print(
            f"{'':8} {spread[0]:>12} {spread[1]:>11} {spread[2]:>13} {'':13} {'':12} {protocol_range:>15}", flush=True
        )
        took[key] = time.time() - t_section
    stackable = [k for k in args.models if k in ("cnn", "fc")]
    if stackable:
        print("stacked trainer: N members in one step, img/s summed over them; per-run speed-up = stacked / engine")
        print(f"{'model':8} {'N':>4} {'stacked img/s':>14} {'range':>15} {'stacked/engine':>15}")
    for key in stackable:
        t_section = time.time()
        for n in stacks:
            rows = [[stacked(MODELS[key], x, y, steps, warm, args.batch, dev, n)] for _ in range(args.repeats)]
            mean, spread = _mean_and_range(rows)
            print(f"{key:8} {n:4d} {mean[0]:14.0f} {spread[0]:>15} {mean[0] / engine_mean[key]:14.2f}x", flush=True)
        took[f"stacked {key}"] = time.time() - t_section
    sections = ", ".join(f"{k} {v:.1f} s" for k, v in took.items())
    print(f"wall time: {sections}; in all {time.time() - t_start:.1f} s")


def _mean_and_range(rows):
    """Column means and ``"(min-max)"`` strings of ``rows`` (one list of numbers per repeat)."""
    mean = [sum(c) / len(c) for c in zip(*rows)]
    spread = [f"({min(c):.0f}-{max(c):.0f})" for c in zip(*rows)]
    return mean, spread


if __name__ == "__main__":
    main()
