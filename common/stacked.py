"""Many small networks trained at once: N members of the same 2-layer CNN or fully connected net
in one stacked step (the paper pools many independent runs: Figure 4, Figure 20, Figure 5).

On a GPU a 2-layer CNN at batch 256 is bound by kernel launches, not arithmetic; stacking N
members makes each launch do N members' work. The stacked step is exact, not an approximation:
member i has its own initial weights (copied from ``models[i]``), its own batch order (its own
:class:`common.data.DeviceLoader` with ``data_seeds[i]``), its own labels, and SGD's update is
elementwise, so member i follows the trajectory that ``train(models[i], x, ys[i],
data_seed=data_seeds[i])`` would, up to the summation order of the kernels (tested in float64 to
1e-12, ``tests/test_stacked.py``). Weights are written back into ``models`` at the end.

Stacked layouts (N members, batch B):
- conv ``(N*F, C, k, k)`` applied as one grouped convolution (``groups=N``) to the members' batches
  concatenated along channels, ``(B, N*C, H, W)``;
- linear layers ``(N, out, in)`` applied with ``torch.baddbmm`` to ``(N, B, in)``.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import DeviceLoader
from .models import TwoLayerCNN, TwoLayerFC
from .train import (
    _autocast,
    _due_callbacks,
    _record_callbacks,
    _recorded_at,
    _wide,
    device,
    keep_freed_memory,
    lr_at,
    n_steps,
)


class StackedNet(nn.Module):
    """The stacked parameters of N identical :class:`TwoLayerCNN` or :class:`TwoLayerFC` members.
    ``forward(xb (N, B, ...)) -> (N, B, K)`` logits; ``member(i)`` / ``write_back(models)`` copy member
    i's weights out."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        kinds = {type(m) for m in models}
        if len(kinds) != 1 or not kinds <= {TwoLayerCNN, TwoLayerFC}:
            raise TypeError(f"train_stacked stacks TwoLayerCNN or TwoLayerFC members of one kind, got {kinds}")
        self.kind = kinds.pop()
        self.n = len(models)
        first = "conv" if self.kind is TwoLayerCNN else "fc1"
        self.layer_names = [first, "fc", "head"] if self.kind is TwoLayerCNN else ["fc1", "fc2", "head"]
        shapes = {tuple(p.shape) for m in models for p in [m.get_submodule(first).weight]}
        if len(shapes) != 1:
            raise ValueError(f"members differ in shape: {shapes}")
        for name in self.layer_names:
            w = torch.stack([m.get_submodule(name).weight.detach() for m in models])
            b = torch.stack([m.get_submodule(name).bias.detach() for m in models])
            if name == "conv":
                self.conv_shape = tuple(w.shape[1:])  # (F, C, k, k)
                w, b = w.flatten(0, 1), b.flatten()  # (N*F, C, k, k), (N*F,)
            self.register_parameter(f"{name}_w", nn.Parameter(w.clone()))
            self.register_parameter(f"{name}_b", nn.Parameter(b.clone()))

    def _linear(self, name, h):  # h (N, B, in) -> (N, B, out)
        w, b = getattr(self, f"{name}_w"), getattr(self, f"{name}_b")
        return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        n, bsz = xb.shape[:2]
        if self.kind is TwoLayerCNN:
            x = xb.transpose(0, 1).flatten(1, 2)  # (B, N*C, H, W)
            h = F.relu(F.conv2d(x, self.conv_w, self.conv_b, groups=n))  # (B, N*F, H', W')
            h = h.reshape(bsz, n, -1).transpose(0, 1)  # (N, B, F*H'*W'), each member's (F, H', W') order
            h = F.relu(self._linear("fc", h))
        else:
            h = F.relu(self._linear("fc1", xb.flatten(2)))
            h = F.relu(self._linear("fc2", h))
        return self._linear("head", h)

    @torch.no_grad()
    def write_back(self, models: Sequence[nn.Module]) -> None:
        for i, m in enumerate(models):
            for name in self.layer_names:
                w, b = getattr(self, f"{name}_w"), getattr(self, f"{name}_b")
                if name == "conv":
                    f = self.conv_shape[0]
                    w, b = w[i * f : (i + 1) * f], b[i * f : (i + 1) * f]
                else:
                    w, b = w[i], b[i]
                m.get_submodule(name).weight.copy_(w)
                m.get_submodule(name).bias.copy_(b)


def train_stacked(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    ys,
    *,
    data_seeds: Sequence[int],
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    schedule: str = "constant",
    milestones: Sequence[float] = (1 / 3, 2 / 3),
    gamma: float = 1 / 3,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    eval_sets: Optional[Dict[str, Tuple[torch.Tensor, object]]] = None,
    eval_every: Optional[int] = None,
    eval_at: Sequence[int] = (),
    callbacks: Sequence[Tuple[object, Callable]] = (),
    log_every: int = 50,
    dev: Optional[torch.device] = None,
    desc: str = "stacked",
) -> list:
    """Train ``models`` (N members) together; return one history per member, as :func:`common.train.train`
    returns them (without checkpointing). ``ys``: one ``(N_x,)`` label tensor for every member, or a
    list of N. ``eval_sets`` map names to ``(x, y)`` with ``y`` a tensor or a list of N. Callbacks
    are called per member as ``fn(model_i, step)`` with the member's current weights written back.
    A progress bar (``desc``, off under ``CI``) shows the steps and the members' mean training loss
    and accuracy at each log step."""
    dev = dev or device()
    n = len(models)
    ys = list(ys) if isinstance(ys, (list, tuple)) else [ys] * n
    if len(ys) != n or len(data_seeds) != n:
        raise ValueError("give one label tensor (or one for all) and one data seed per member")
    steps = n_steps(steps, epochs, len(x), batch_size)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as common.train.train sets it, whichever trainer runs first
    else:
        keep_freed_memory()
    models = [m.to(dev, dtype) for m in models]  # in place: weights are written back into them
    net = StackedNet(models).to(dev, dtype)
    net.train()
    loaders = [DeviceLoader(x, yi, batch_size, dev, s, dtype=dtype) for yi, s in zip(ys, data_seeds)]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    evals = {}
    for name, (xe, ye) in (eval_sets or {}).items():
        ye = list(ye) if isinstance(ye, (list, tuple)) else [ye] * n
        evals[name] = (xe.to(dev, dtype), torch.stack([t.to(dev) for t in ye]))
    eval_at = set(eval_at)
    chunk = max(1, 2000 // n)  # evaluation images per forward pass: n * chunk member-images, as one unstacked batch
    hists = [{"train": {}, "eval": {}, "callbacks": {}} for _ in range(n)]

    def add(table, key, values):
        for h, v in zip(hists, values):
            h[table].setdefault(key, []).append(v)

    @torch.no_grad()
    def record(s):
        if evals and _recorded_at(s, steps, eval_every, eval_at):
            add("eval", "step", [s] * n)
            net.eval()
            for name, (xe, ye) in evals.items():
                loss = torch.zeros(n, dtype=torch.float64, device=dev)
                correct = torch.zeros(n, dtype=torch.int64, device=dev)
                for a in range(0, len(xe), chunk):
                    xb = xe[a : a + chunk].unsqueeze(0).expand(n, *xe[a : a + chunk].shape)
                    with _autocast(dev):
                        out = net(xb)
                    yb = ye[:, a : a + chunk]
                    loss += F.cross_entropy(_wide(out).flatten(0, 1), yb.flatten(), reduction="none").view(n, -1).sum(1)
                    correct += (out.argmax(2) == yb).sum(1)
                add("eval", f"{name}_loss", (loss / len(xe)).tolist())
                add("eval", f"{name}_acc", [c / len(xe) for c in correct.tolist()])
            net.train()
        due = _due_callbacks(callbacks, s, steps)
        if due:  # the members' current weights, written back only when a callback reads them
            net.write_back(models)
            for h, m in zip(hists, models):
                _record_callbacks(h["callbacks"], due, m, s)

    from tqdm import tqdm  # the same plain text bar as common.train.train

    bar = tqdm(total=steps, desc=f"{desc} x{n}", disable=bool(os.environ.get("CI")), leave=False, mininterval=1.0)
    t0 = time.time()
    record(0)
    run_loss = torch.zeros(n, dtype=torch.float64, device=dev)
    run_acc = torch.zeros(n, dtype=torch.float64, device=dev)
    run_n = 0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, schedule, milestones, gamma)
        batches = [ld.next_batch() for ld in loaders]
        xb = torch.stack([b[0] for b in batches])
        yb = torch.stack([b[1] for b in batches])
        with _autocast(dev):
            out = net(xb)  # (N, B, K)
        per = F.cross_entropy(_wide(out).flatten(0, 1), yb.flatten(), reduction="none").view(n, -1).mean(1)
        opt.zero_grad(set_to_none=True)
        per.sum().backward()  # member i's parameters only see member i's loss
        opt.step()
        run_loss += per.detach().to(torch.float64)
        run_acc += (out.argmax(2) == yb).to(torch.float64).mean(1)
        run_n += 1
        if step % log_every == 0 or step == steps:
            add("train", "step", [step] * n)
            add("train", "loss", (run_loss / run_n).tolist())
            add("train", "acc", (run_acc / run_n).tolist())
            bar.set_postfix(loss=f"{float(run_loss.mean()) / run_n:.3f}", acc=f"{float(run_acc.mean()) / run_n:.3f}")
            run_loss.zero_()
            run_acc.zero_()
            run_n = 0
        if step < steps:
            record(step)
        bar.update(1)
    record(steps)
    bar.close()
    net.write_back(models)
    wall = time.time() - t0
    for h in hists:
        h["steps"] = steps
        h["wall_s"] = wall / n
        h["stacked"] = n
    return hists
