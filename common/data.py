"""CIFAR-10 on disk and on the device: loading, splits, random labels, standardisation, batching.

docs/protocol.md, "Data", "Random labels" and "Splits and seeds".

Images stay ``(N, 3, 32, 32) uint8`` until :func:`standardize` turns them into
``(N, 3, 32, 32) float32``; labels are ``(N,) int64``. Every random choice takes its own seed:
splits, labels, data order and model init never share a generator.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
ROWS_PER_FILE = 10_000
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CifarFileError(RuntimeError):
    """A CIFAR-10 batch file is missing, truncated or does not hold what it should."""


class Cifar10(NamedTuple):
    """The data set as tensors: ``x_* (N, 3, 32, 32) uint8``, ``y_* (N,) int64``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple
    fake: bool = False


def cifar10_root(root: Optional[os.PathLike] = None) -> Path:
    """The folder that holds (or will hold) ``cifar-10-batches-py``: the argument, else
    ``$CIFAR10_ROOT``, else ``<repo>/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("CIFAR10_ROOT")
    return Path(env).expanduser() if env else REPO_ROOT / "data"


def _read_batch(path: Path):
    """One pickled batch -> ``(10000, 3, 32, 32) uint8`` array and ``(10000,) int64`` labels.

    Reads py2-style pickles (bytes keys, ``encoding='bytes'``) and py3 pickles (str keys).
    """
    if not path.is_file():
        raise CifarFileError(f"CIFAR-10 batch file missing: {path}")
    try:
        with open(path, "rb") as fh:
            raw = pickle.load(fh, encoding="bytes")
    except Exception as err:  # truncated or corrupt pickles raise many different types
        raise CifarFileError(
            f"CIFAR-10 batch file {path} is truncated or corrupt "
            f"({type(err).__name__}: {err}); load_cifar10(download=True) (or `make data`) fetches the "
            f"archive again and replaces it, or rebuild the folder from another copy"
        ) from err
    if not isinstance(raw, dict):
        raise CifarFileError(f"CIFAR-10 batch file {path} does not hold a dict")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    if "data" not in batch or "labels" not in batch:
        raise CifarFileError(f"CIFAR-10 batch file {path} lacks 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.shape != (ROWS_PER_FILE, 3 * 32 * 32):
        raise CifarFileError(
            f"CIFAR-10 batch file {path}: data is {data.dtype} {data.shape}, expected uint8 ({ROWS_PER_FILE}, 3072)"
        )
    if labels.shape != (ROWS_PER_FILE,) or labels.min() < 0 or labels.max() > 9:
        raise CifarFileError(
            f"CIFAR-10 batch file {path}: labels have shape {labels.shape} and "
            f"range [{labels.min()}, {labels.max()}], expected ({ROWS_PER_FILE},) in 0..9"
        )
    return data.reshape(ROWS_PER_FILE, 3, 32, 32), labels


def _download(root: Path) -> None:
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as err:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root / FOLDER}, and the download needs torchvision, which is not installed "
            f"(pip install -e '.[download]'). Set CIFAR10_ROOT to a folder that holds {FOLDER}/ (or pass root=...), "
            f"or download {CIFAR10_URL} by hand and extract it into {root}."
        ) from err
    try:
        download_and_extract_archive(CIFAR10_URL, download_root=str(root), md5=CIFAR10_MD5)
    except Exception as err:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root / FOLDER} and the download from {CIFAR10_URL} failed "
            f"({type(err).__name__}: {err}). Set CIFAR10_ROOT to a folder that holds "
            f"{FOLDER}/ (or pass root=...), or download the archive by hand and extract it "
            f"into {root}."
        ) from err


_CACHE: dict = {}


def load_cifar10(root: Optional[os.PathLike] = None, download: bool = True) -> Cifar10:
    """The 50,000 training and 10,000 test images of CIFAR-10, in their original order.

    Returns :class:`Cifar10` with ``x_train (50000, 3, 32, 32) uint8``, ``y_train (50000,) int64``,
    ``x_test (10000, 3, 32, 32) uint8``, ``y_test (10000,) int64`` and the class names. Looks in
    ``root``, else ``$CIFAR10_ROOT``, else ``<repo>/data``; a missing folder is downloaded (md5
    checked) when ``download`` is true. Results are memoised per folder within the process.
    """
    base = cifar10_root(root)
    folder = base / FOLDER
    key = str(folder.resolve())
    if key in _CACHE:
        return _CACHE[key]
    if not folder.is_dir():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: no folder {folder}. Set CIFAR10_ROOT to a folder holding "
                f"{FOLDER}/, or allow download=True (fetches {CIFAR10_URL})."
            )
        _download(base)
    try:
        train = [_read_batch(folder / name) for name in TRAIN_FILES]
        x_test, y_test = _read_batch(folder / TEST_FILE)
    except CifarFileError as err:
        if not download:
            raise
        print(f"CIFAR-10: {err}; fetching the archive again into {base}")
        _download(base)
        train = [_read_batch(folder / name) for name in TRAIN_FILES]
        x_test, y_test = _read_batch(folder / TEST_FILE)
    classes = CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as fh:
            raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in pickle.load(fh, encoding="bytes").items()}
        names = raw.get("label_names")
        if names and len(names) == 10:
            classes = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
    out = Cifar10(
        x_train=torch.from_numpy(np.concatenate([d for d, _ in train])),
        y_train=torch.from_numpy(np.concatenate([l for _, l in train])),
        x_test=torch.from_numpy(x_test.copy()),
        y_test=torch.from_numpy(y_test.copy()),
        classes=classes,
    )
    _CACHE[key] = out
    return out


def fake_cifar10(n: int = 2000, seed: int = 0, n_test: Optional[int] = None) -> Cifar10:
    """A small deterministic stand-in with CIFAR-10's shapes, for smoke runs and tests.

    Images are Gaussian noise blurred with a 7x7 kernel and mixed across channels, so they are
    spatially and chromatically correlated like natural images (patch covariance with a dominant
    DC direction), then quantised to ``uint8``. Labels ``(n,) int64`` depend on the image (the
    sign pattern of the mean colour), so real-label training can learn them. ``fake=True``.
    """
    n_test = n // 5 if n_test is None else n_test
    g = torch.Generator().manual_seed(seed)
    total = n + n_test
    noise = torch.randn(total, 3, 38, 38, generator=g)
    r = torch.arange(7, dtype=torch.float32) - 3
    k1 = torch.exp(-(r**2) / (2 * 1.5**2))
    kernel = (k1[:, None] * k1[None, :]) / (k1.sum() ** 2)
    blurred = F.conv2d(noise, kernel.expand(3, 1, 7, 7), groups=3)  # (total, 3, 32, 32)
    mix = torch.tensor([[1.0, 0.6, 0.4], [0.6, 1.0, 0.6], [0.4, 0.6, 1.0]])
    imgs = torch.einsum("ij,njhw->nihw", mix, blurred)
    imgs = imgs + 0.3 * torch.randn(total, 3, 1, 1, generator=g)  # per-image colour cast
    imgs = (imgs - imgs.mean()) / imgs.std()
    x = (imgs * 50 + 120).round().clamp(0, 255).to(torch.uint8)
    m = x.float().mean(dim=(2, 3)) - x.float().mean(dim=(0, 2, 3))
    y = ((m[:, 0] > 0).long() * 4 + (m[:, 1] > 0).long() * 2 + (m[:, 2] > 0).long()) % 10
    return Cifar10(x[:n], y[:n], x[n:], y[n:], CLASSES, fake=True)


def load_data(real: bool = True, fake_n: int = 2000, root=None, allow_fake: bool = True) -> Cifar10:
    """The real CIFAR-10 when it can be found (no download attempt), else :func:`fake_cifar10`
    when ``allow_fake`` (the smoke presets), else the loader's FileNotFoundError.

    Prints which one it returned, so a smoke run on stand-in data says so in its output.
    """
    if real:
        try:
            data = load_cifar10(root, download=False)
            print(f"data: real CIFAR-10 from {cifar10_root(root) / FOLDER}")
            return data
        except FileNotFoundError as err:
            if not allow_fake:
                raise
            print(f"data: real CIFAR-10 unavailable ({err})")
    print(
        f"data: FAKE CIFAR-10 stand-in (fake_cifar10, {fake_n} train images): "
        "numbers from this run say nothing about the paper"
    )
    return fake_cifar10(fake_n)


def disjoint_split(n: int, sizes: Sequence[int], seed: int) -> list:
    """Non-overlapping index sets of the given sizes drawn from ``range(n)``.

    Returns a list of ``(size,) int64`` tensors (one permutation, consecutive slices).
    """
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} add up to {sum(sizes)} > n = {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s].clone())
        start += s
    return out


def random_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """``(n,) int64`` labels i.i.d. uniform on ``0..num_classes-1``, drawn once from their own
    generator (docs/protocol.md, "Random labels"), so no other seed can change them."""
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def channel_stats(x: torch.Tensor):
    """Per-channel mean and std (``n - 1``) of ``(N, 3, H, W) uint8`` images scaled to [0, 1]:
    two ``(3,)`` float64 tensors. Computed from exact integer sums, so the result is bit-identical
    on every machine and torch version (the run cache keys on the standardised images' bytes). The sums come from
    each channel's histogram of the 256 pixel values, so no int64 copy of the images is made."""
    counts = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])])  # (C, 256)
    v = torch.arange(256, dtype=torch.int64)
    n = x.numel() // x.shape[1]
    s1 = (counts * v).sum(dim=1).to(torch.float64)
    s2 = (counts * (v * v)).sum(dim=1).to(torch.float64)
    mean = s1 / n
    var = (s2 - s1 * s1 / n) / (n - 1)
    return mean / 255.0, var.sqrt() / 255.0


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W) uint8`` -> ``(N, 3, H, W) float32``, ``(x/255 - mean) / std`` per channel, each operation in
    float32 in that order, in place on one float32 copy (bit-identical to three out-of-place operations)."""
    m = mean.to(torch.float32).view(1, -1, 1, 1)
    s = std.to(torch.float32).view(1, -1, 1, 1)
    return x.to(torch.float32, copy=True).div_(255.0).sub_(m).div_(s)


def standardized(data: Cifar10):
    """Train and test images standardised with the *training*-set statistics (docs/protocol.md, "Data"):
    ``(x_train, x_test)`` as ``float32`` tensors."""
    mean, std = channel_stats(data.x_train)
    return standardize(data.x_train, mean, std), standardize(data.x_test, mean, std)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched augmentation on the device: random ``pad``-pixel translation (reflect padding is
    not used; zeros, as in the usual CIFAR recipe) and horizontal flip. ``(B, C, H, W)`` in and out."""
    b, c, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, c, h, w)
    xp = xp.gather(3, cols)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], xp.flip(3), xp)


class DeviceLoader:
    """Mini-batches from a tensor set that lives on the device.

    ``x (N, ...)`` (cast to ``dtype``, float32 by default) and ``y (N,) int64`` move to ``device``
    once (channels_last for 4-d inputs on CUDA). Each epoch is one ``torch.randperm`` on the device; a batch is an index
    slice. The last partial batch of an epoch is dropped when ``drop_last``. The iteration state
    (generator, permutation, position) round-trips through :meth:`state_dict` for exact resume.
    """

    def __init__(
        self,
        x,
        y,
        batch_size: int,
        device,
        seed: int,
        augment: bool = False,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        x = x.to(self.device, dtype)
        if x.dim() == 4 and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = x, y.to(self.device)
        self.n = len(self.y)
        self.batch_size = min(batch_size, self.n)
        self.augment, self.drop_last = augment, drop_last
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.perm, self.pos = None, 0

    def next_batch(self):
        """``(x (B, ...), y (B,))``; starts a new epoch when the current one is used up."""
        need = self.batch_size if self.drop_last else 1
        if self.perm is None or self.pos + need > self.n:
            self.perm = torch.randperm(self.n, device=self.device, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += len(idx)
        xb = self.x[idx]
        if self.augment:
            xb = random_crop_flip(xb, self.gen)
        return xb, self.y[idx]

    def state_dict(self):
        return {"gen": self.gen.get_state(), "perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.device)
        self.pos = state["pos"]


def per_image_standardize(x: torch.Tensor) -> torch.Tensor:
    """The alternative input normalisation of the Figure 4 recipe sweep: each ``(3, H, W) uint8``
    image of ``x (N, 3, H, W)`` scaled to [0, 1], minus its own mean over pixels and channels,
    divided by its own std (``n - 1``; at least ``1 / sqrt(3 H W)``, so flat images stay finite).
    Returns ``(N, 3, H, W) float32``."""
    xf = x.to(torch.float64) / 255.0
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    std = xf.std(dim=(1, 2, 3), keepdim=True).clamp_min(xf[0].numel() ** -0.5)
    return ((xf - mean) / std).to(torch.float32)
