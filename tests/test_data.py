import hashlib
import pickle

import numpy as np
import pytest
import torch

from common import data as D

ROWS = 20


def _write_batch(path, data, labels, py2):
    if py2:  # python-2 style: bytes keys, as the official archive
        obj = {b"batch_label": b"x", b"labels": list(labels), b"data": data, b"filenames": [b"f"] * len(labels)}
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    else:
        obj = {"labels": list(map(int, labels)), "data": data}
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)


def _make_folder(root, py2, rng):
    folder = root / D.FOLDER
    folder.mkdir(parents=True)
    arrays = {}
    for name in D.TRAIN_FILES + [D.TEST_FILE]:
        data = rng.integers(0, 256, (ROWS, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, ROWS)
        _write_batch(folder / name, data, labels, py2)
        arrays[name] = (data, labels)
    return folder, arrays


@pytest.fixture
def small_rows(monkeypatch):
    monkeypatch.setattr(D, "ROWS_PER_FILE", ROWS)
    D._CACHE.clear()
    yield
    D._CACHE.clear()


@pytest.mark.parametrize("py2", [True, False])
def test_loader_reads_both_pickle_styles(tmp_path, small_rows, py2):
    folder, arrays = _make_folder(tmp_path, py2, np.random.default_rng(0))
    d = D.load_cifar10(tmp_path, download=False)
    assert d.x_train.shape == (5 * ROWS, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.y_train.dtype == torch.int64 and d.x_test.shape == (ROWS, 3, 32, 32)
    # pixel (c, h, w) of row r is byte c*1024 + h*32 + w of the raw row; batches in file order
    raw2, lab2 = arrays["data_batch_2"]
    r = 7
    assert d.x_train[ROWS + r, 1, 3, 5].item() == raw2[r, 1024 + 3 * 32 + 5]
    assert torch.equal(d.y_train[ROWS : 2 * ROWS], torch.as_tensor(lab2))
    assert d.classes[0] == "airplane" and len(d.classes) == 10


def test_root_from_environment(tmp_path, small_rows, monkeypatch):
    _make_folder(tmp_path, True, np.random.default_rng(1))
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path))
    assert D.load_cifar10(download=False).x_train.shape[0] == 5 * ROWS


def test_missing_folder_offline_names_path_and_variable(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        D.load_cifar10(tmp_path / "nowhere", download=False)
    assert str(tmp_path / "nowhere") in str(err.value) and "CIFAR10_ROOT" in str(err.value)


def test_failed_download_fails_fast_with_url(tmp_path, monkeypatch):
    pytest.importorskip("torchvision", reason="the download goes through torchvision (the project's [download] extra)")
    monkeypatch.setattr(D, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(FileNotFoundError) as err:
        D.load_cifar10(tmp_path, download=True)
    msg = str(err.value)
    assert "127.0.0.1:9" in msg and "CIFAR10_ROOT" in msg and str(tmp_path) in msg


def test_download_without_torchvision_names_the_extra_and_the_variable(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # what `import torchvision` meets where it is missing
    monkeypatch.setitem(sys.modules, "torchvision.datasets.utils", None)
    with pytest.raises(FileNotFoundError) as err:
        D.load_cifar10(tmp_path, download=True)
    msg = str(err.value)
    assert "torchvision" in msg and "[download]" in msg and "CIFAR10_ROOT" in msg and str(tmp_path) in msg


def test_missing_batch_file_is_named(tmp_path, small_rows):
    folder, _ = _make_folder(tmp_path, True, np.random.default_rng(2))
    (folder / "data_batch_4").unlink()
    with pytest.raises(D.CifarFileError, match="data_batch_4"):
        D.load_cifar10(tmp_path, download=False)


def test_damaged_folder_is_fetched_again_when_download_is_allowed(tmp_path, small_rows, monkeypatch):
    folder, _ = _make_folder(tmp_path, True, np.random.default_rng(2))
    (folder / "data_batch_2").write_bytes(b"truncated")
    fetched = []

    def fake_download(root):  # what the real download does: extract complete files over the old ones
        fetched.append(root)
        _write_batch(folder / "data_batch_2", np.zeros((ROWS, 3072), np.uint8), [1] * ROWS, True)

    monkeypatch.setattr(D, "_download", fake_download)
    d = D.load_cifar10(tmp_path, download=True)
    assert fetched == [tmp_path] and d.x_train.shape[0] == 5 * ROWS
    assert (d.y_train[ROWS : 2 * ROWS] == 1).all()


def test_truncated_batch_file_is_named(tmp_path, small_rows):
    folder, _ = _make_folder(tmp_path, False, np.random.default_rng(3))
    blob = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(D.CifarFileError, match="data_batch_3"):
        D.load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("bad", ["rows", "labels", "garbage"])
def test_corrupt_batch_contents_are_named(tmp_path, small_rows, bad):
    folder, _ = _make_folder(tmp_path, True, np.random.default_rng(4))
    path = folder / "test_batch"
    if bad == "rows":  # silently fewer images must not pass
        _write_batch(path, np.zeros((ROWS - 1, 3072), np.uint8), [0] * (ROWS - 1), True)
    elif bad == "labels":
        _write_batch(path, np.zeros((ROWS, 3072), np.uint8), [12] * ROWS, True)
    else:
        path.write_bytes(b"\x00not a pickle at all" * 10)
    with pytest.raises(D.CifarFileError, match="test_batch"):
        D.load_cifar10(tmp_path, download=False)


def test_disjoint_split():
    a, b = D.disjoint_split(1000, [200, 250], seed=3)
    assert len(a) == 200 and len(b) == 250
    assert len(set(a.tolist()) | set(b.tolist())) == 450
    a2, b2 = D.disjoint_split(1000, [200, 250], seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, D.disjoint_split(1000, [200, 250], seed=4)[0])
    with pytest.raises(ValueError):
        D.disjoint_split(10, [6, 6], seed=0)


def test_random_labels_are_uniform_and_independent_of_global_seed():
    torch.manual_seed(0)
    y1 = D.random_labels(50_000, 10, seed=7)
    torch.manual_seed(123)
    torch.randn(100)
    y2 = D.random_labels(50_000, 10, seed=7)
    assert torch.equal(y1, y2) and y1.dtype == torch.int64
    counts = torch.bincount(y1, minlength=10).double()
    chi2 = (((counts - 5000) ** 2) / 5000).sum().item()
    assert chi2 < 27.9  # 99.9% quantile of chi^2 with 9 dof
    assert not torch.equal(y1, D.random_labels(50_000, 10, seed=8))


def test_standardize_matches_numpy():
    x = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    mean, std = D.channel_stats(x)
    xn = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean.numpy(), xn.mean(axis=(0, 2, 3)))
    assert np.allclose(std.numpy(), xn.std(axis=(0, 2, 3), ddof=1))
    # exactly: the statistics from numpy's integer sums, the images from three float32 operations in numpy
    xi = x.numpy().astype(np.int64)
    s1, s2, n = xi.sum(axis=(0, 2, 3)).astype(np.float64), (xi * xi).sum(axis=(0, 2, 3)).astype(np.float64), 20 * 16
    assert np.array_equal(mean.numpy(), s1 / n / 255.0)
    assert np.array_equal(std.numpy(), np.sqrt((s2 - s1 * s1 / n) / (n - 1)) / 255.0)
    z = D.standardize(x, mean, std).numpy()
    m32, s32 = (t.numpy().astype(np.float32)[None, :, None, None] for t in (mean, std))
    assert z.dtype == np.float32 and np.array_equal(z, (x.numpy().astype(np.float32) / np.float32(255) - m32) / s32)
    ref = (xn - xn.mean(axis=(0, 2, 3))[None, :, None, None]) / xn.std(axis=(0, 2, 3), ddof=1)[None, :, None, None]
    assert np.allclose(z, ref, atol=1e-5)
    assert x.dtype == torch.uint8  # the input is left alone


def test_per_image_standardize_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    x[3] = 77  # a flat image stays finite (zeros)
    out = D.per_image_standardize(torch.from_numpy(x)).numpy()
    for i in range(3):
        xf = x[i].astype(np.float64) / 255
        np.testing.assert_allclose(out[i], (xf - xf.mean()) / xf.std(ddof=1), rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32 and np.abs(out[3]).max() < 1e-12


def test_device_loader_epochs_cover_the_set_and_resume():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.arange(10)
    ld = D.DeviceLoader(x, y, batch_size=4, device="cpu", seed=0)
    seen = torch.cat([ld.next_batch()[1] for _ in range(3)])  # 4 + 4 + 2
    assert sorted(seen.tolist()) == list(range(10))
    state = ld.state_dict()
    nxt = [ld.next_batch()[1].tolist() for _ in range(4)]
    ld2 = D.DeviceLoader(x, y, batch_size=4, device="cpu", seed=99)
    ld2.load_state_dict(state)
    assert [ld2.next_batch()[1].tolist() for _ in range(4)] == nxt
    xb, yb = ld.next_batch()
    assert torch.equal(xb[:, 0].long(), yb)


def test_random_crop_flip_is_a_shift_or_mirror():
    x = torch.randn(16, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = D.random_crop_flip(x, g, pad=0)
    for i in range(16):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    out = D.random_crop_flip(x, g, pad=2)
    assert out.shape == x.shape


def test_fake_cifar10_is_deterministic_and_spatially_correlated():
    a, b = D.fake_cifar10(200, seed=1), D.fake_cifar10(200, seed=1)
    assert torch.equal(a.x_train, b.x_train) and a.fake
    assert a.x_train.shape == (200, 3, 32, 32) and a.x_train.dtype == torch.uint8
    assert a.x_test.shape == (40, 3, 32, 32)
    xf = a.x_train.double()
    left, right = xf[..., :-1].flatten(), xf[..., 1:].flatten()
    corr = np.corrcoef(left.numpy(), right.numpy())[0, 1]
    assert corr > 0.5  # neighbouring pixels correlate, unlike white noise
    assert len(torch.unique(a.y_train)) > 3


@pytest.mark.real_data
def test_real_cifar10_contents(cifar):
    assert cifar.x_train.shape == (50_000, 3, 32, 32) and cifar.x_test.shape == (10_000, 3, 32, 32)
    assert cifar.x_train.dtype == torch.uint8 and cifar.y_train.dtype == torch.int64
    assert cifar.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    mean, _ = D.channel_stats(cifar.x_train)
    assert np.allclose(mean.numpy(), [0.4914, 0.4822, 0.4465], atol=5e-4)
    assert torch.bincount(cifar.y_test).tolist() == [1000] * 10


@pytest.mark.real_data
def test_real_cifar10_standardises_to_the_same_bytes_as_before(cifar):
    """The run cache keys on these bytes: the SHA-256 of the standardised training and test images, as the first
    implementation (int64 sums, out-of-place float32 operations) gave them on the dev CPU."""
    x_train, x_test = D.standardized(cifar)
    assert hashlib.sha256(x_train.numpy().tobytes()).hexdigest() == (
        "f3cd9f0aa761e89935880766ee4abfd28f4d9954152a88fe107de4563ec70afb"
    )
    assert hashlib.sha256(x_test.numpy().tobytes()).hexdigest() == (
        "8c7123f25a561adaf2d4a5ae5b47f6b29a5ff460364ca2b9e9104003076bcc6e"
    )


def test_load_data_falls_back_only_when_allowed(tmp_path, capsys):
    d = D.load_data(fake_n=64, root=tmp_path / "none")
    assert d.fake and d.x_train.shape[0] == 64 and "FAKE" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        D.load_data(fake_n=64, root=tmp_path / "none", allow_fake=False)
