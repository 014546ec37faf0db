"""The run cache: keys built from what defines a run, never a stale or foreign entry."""

import json

import pytest
import torch

from common import cache as C
from common.data import fake_cifar10, standardized
from common.models import spec
from common.probes import FirstLayerMisalignment
from common.train import cached_train


def _fn(counter, value=1.0):
    def fn(scratch):
        counter.append(scratch)
        return {"acc": [value]}, {"w": torch.full((2,), value)}

    return fn


def test_miss_then_hit_and_key_order_is_irrelevant(tmp_path):
    calls = []
    k1 = C.run_key(lr=0.1, model={"name": "cnn", "width": 2}, data=torch.arange(5))
    r1 = C.cached_run(k1, _fn(calls), root=tmp_path)
    assert not r1.hit and len(calls) == 1
    k2 = C.run_key(data=torch.arange(5), model={"width": 2, "name": "cnn"}, lr=0.1)
    r2 = C.cached_run(k2, _fn(calls), root=tmp_path)
    assert r2.hit and r2.source == "cache" and len(calls) == 1 and r2.history == {"acc": [1.0]}
    assert torch.equal(r2.states["w"], torch.ones(2))
    stored = json.loads((r1.path / "key.json").read_text())
    assert stored["key"] == k1 and stored["git_commit"]


def test_git_commit_names_the_checkout_or_the_declared_commit_of_a_copied_tree(tmp_path, monkeypatch):
    """In the checkout: git's short hash. In a copied tree without .git (a lent GPU machine's copy): $GIT_COMMIT,
    else "unknown"."""
    import subprocess

    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=C.REPO_ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # the suite runs in a checkout (CI's clean clone): git wins over the variable
        assert C.git_commit().removesuffix("+dirty") == head.stdout.strip()
    copy = tmp_path / "copy"
    copy.mkdir()
    monkeypatch.setattr(C, "REPO_ROOT", copy)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a repository above the copy
    assert C.git_commit() == "abc1234"
    monkeypatch.delenv("GIT_COMMIT")
    assert C.git_commit() == "unknown"


def test_tensors_enter_the_key_by_content():
    a = C.run_key(x=torch.zeros(3))
    assert a == C.run_key(x=torch.zeros(3).clone())
    assert a != C.run_key(x=torch.tensor([0.0, 0.0, 1e-30]))
    assert a != C.run_key(x=torch.zeros(3, dtype=torch.float64))
    t = torch.zeros(3)
    before = C.run_key(x=t)
    t[1] = 2.0  # changed in place after being hashed
    assert C.run_key(x=t) != before


def test_a_keyed_tensor_enters_the_key_by_its_recipe_not_its_last_bits(monkeypatch):
    """A basis from LAPACK keyed by what made it: the same key when another LAPACK rounds its last bits otherwise
    (simulated by an error of 1e-15 in the QR), a different key for other arguments, its bytes again once changed
    in place. Arguments that are keyed results themselves enter by their recipe."""
    from common import alignment as A

    R = C.keyed(A.random_orthonormal_basis, 27, seed=0)
    assert torch.equal(R, A.random_orthonormal_basis(27, seed=0))
    key = C.run_key(bases={"random": R})
    assert key["parts"]["bases"]["random"] == {
        "made_by": {"fn": "alignment.random_orthonormal_basis", "args": [27], "kwargs": {"seed": 0}}
    }
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda Z: tuple(t * (1 + 1e-15) for t in qr(Z)))
    other_machine = C.keyed(A.random_orthonormal_basis, 27, seed=0)
    assert not torch.equal(other_machine, R)
    assert C.run_key(bases={"random": other_machine}) == key
    assert C.run_key(bases={"random": other_machine.clone()}) != C.run_key(bases={"random": R.clone()})
    assert C.run_key(bases={"random": C.keyed(A.random_orthonormal_basis, 27, seed=1)}) != key
    R[0, 0] += 1.0  # changed in place: keyed by its bytes again
    assert C.run_key(bases={"random": R}) == C.run_key(bases={"random": R.clone()}) != key

    x = fake_cifar10(16, seed=0).x_train.float()
    lam, V = C.keyed(A.eigh_desc, C.keyed(A.patch_covariance, x, 3))
    made = C.canonical(V)["made_by"]
    assert made["output"] == 1 and C.canonical(lam)["made_by"]["output"] == 0
    assert made["args"][0]["made_by"]["args"][0] == {"tensor": C.tensor_fingerprint(x)}
    assert C.canonical(C.keyed(A.eigh_desc, C.keyed(A.patch_covariance, x[:8], 3))[1]) != {"made_by": made}
    assert C.canonical(FirstLayerMisalignment({"data": V}, every=1))["bases"]["data"] == {"made_by": made}


def test_keyed_takes_only_functions_whose_code_is_in_the_key():
    with pytest.raises(TypeError):
        C.keyed(torch.linalg.qr, torch.eye(3))  # torch's code is not in the key
    with pytest.raises(TypeError):
        C.keyed(lambda: torch.zeros(2))
    from common import alignment as A

    with pytest.raises(TypeError):
        C.keyed(A.misalignment_floor, 16, 3, n_draws=2)  # a float, not a tensor


def test_unknown_objects_are_refused():
    with pytest.raises(TypeError):
        C.run_key(model=object())
    with pytest.raises(TypeError):
        C.run_key(callback=lambda model, step: {})  # a function's name does not describe what it computes
    with pytest.raises(ValueError):
        C.cached_run({"lr": 0.1}, _fn([]))  # not a run_key


def test_version_bump_and_force_recompute(tmp_path, monkeypatch):
    calls = []
    C.cached_run(C.run_key(a=1), _fn(calls), root=tmp_path)
    r = C.cached_run(C.run_key(a=1), _fn(calls, 2.0), root=tmp_path, force=True)
    assert not r.hit and r.history == {"acc": [2.0]} and len(calls) == 2
    monkeypatch.setattr(C, "CACHE_VERSION", "999")
    C.cached_run(C.run_key(a=1), _fn(calls), root=tmp_path)
    assert len(calls) == 3


def test_entry_with_a_different_stored_key_is_recomputed(tmp_path):
    calls = []
    key = C.run_key(a=1)
    r = C.cached_run(key, _fn(calls), root=tmp_path)
    doc = json.loads((r.path / "key.json").read_text())
    doc["key"]["parts"]["a"] = 2  # e.g. a hash collision or a hand-copied folder
    (r.path / "key.json").write_text(json.dumps(doc))
    r2 = C.cached_run(key, _fn(calls), root=tmp_path)
    assert not r2.hit and len(calls) == 2


def test_code_fingerprint_ignores_comments_and_docstrings_but_not_code(tmp_path):
    src = 'def f(x):\n    """Doc."""\n    return x + 1  # add one\n'
    (tmp_path / "m.py").write_text(src)
    base = C.code_fingerprint(("m",), tmp_path)
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "m.py").write_text('def f(x):\n    """Other words."""\n\n    return x + 1\n')
    assert C.code_fingerprint(("m",), tmp_path / "m2") == base
    (tmp_path / "m3").mkdir()
    (tmp_path / "m3" / "m.py").write_text('def f(x):\n    """Doc."""\n    return x + 2  # add one\n')
    assert C.code_fingerprint(("m",), tmp_path / "m3") != base


def test_edited_library_code_misses(tmp_path, monkeypatch):
    calls = []
    C.cached_run(C.run_key(a=1), _fn(calls), root=tmp_path)
    monkeypatch.setattr(C, "code_fingerprint", lambda *a, **k: "edited")
    C.cached_run(C.run_key(a=1), _fn(calls), root=tmp_path)
    assert len(calls) == 2


def test_interrupted_run_leaves_no_complete_entry_and_keeps_scratch(tmp_path):
    key = C.run_key(b=2)

    def failing(scratch):
        (scratch / "ckpt.pt").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.cached_run(key, failing, root=tmp_path)
    h = C.key_hash(key)
    assert not (tmp_path / h).exists()
    assert (tmp_path / f"{h}.partial" / "ckpt.pt").is_file()  # resume material survives

    def resume(scratch):
        assert (scratch / "ckpt.pt").read_text() == "partial"
        return {"ok": True}, {}

    r = C.cached_run(key, resume, root=tmp_path)
    assert r.history == {"ok": True} and not (tmp_path / f"{h}.partial").exists()


def test_committed_results_are_consulted_and_recompute_only_for_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    calls = []
    key = C.run_key(c=3)
    C.cached_run(key, _fn(calls), root=tmp_path / "gpu", export="figX")
    assert (tmp_path / "results" / "figX" / f"{C.key_hash(key)}.json").is_file()
    r = C.cached_run(key, _fn(calls, 5.0), root=tmp_path / "laptop")  # empty local cache
    assert r.source == "results" and r.history == {"acc": [1.0]} and len(calls) == 1
    assert torch.equal(r.states["w"], torch.full((2,), 5.0)) and len(calls) == 2  # weights: recomputed once
    assert C.cached_run(key, _fn(calls), root=tmp_path / "laptop").source == "cache" and len(calls) == 2


def test_an_export_cut_short_leaves_no_file_in_results(tmp_path, monkeypatch):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    key = C.run_key(d=4)
    r = C.cached_run(key, _fn([]), root=tmp_path / "gpu")
    folder = tmp_path / "results" / "figX"

    def killed(src, dst):
        raise KeyboardInterrupt  # the process stops between writing and renaming

    with monkeypatch.context() as m:
        m.setattr(C.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            C.export_result(r, "figX")
    assert list(folder.iterdir()) == []  # neither the file nor its temporary
    assert C.lookup(key, root=tmp_path / "laptop") is None
    C.export_result(r, "figX")
    assert [p.name for p in folder.iterdir()] == [f"{C.key_hash(key)}.json"]
    assert C.lookup(key, root=tmp_path / "laptop").history == {"acc": [1.0]}


# ---------------------------------------------------------------- cached_train: the run's own key


@pytest.fixture(scope="module")
def tiny():
    d = fake_cifar10(128, seed=0)
    return standardized(d)[0], d.y_train


def _train(tiny, x=None, model=None, **over):
    args = {**dict(steps=3, batch_size=32, data_seed=0), **over}
    model = model or spec("two_layer_cnn", filters=4, hidden=8, seed=0)
    return cached_train(model, tiny[0] if x is None else x, tiny[1], dev=torch.device("cpu"), **args)


def test_cached_train_keys_on_every_defining_value(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    first = _train(tiny)
    assert not first.hit
    assert _train(tiny).hit
    assert _train(tiny, lr=0.01).hit  # the default, spelled out: same run
    for change in (
        dict(model=spec("two_layer_cnn", filters=4, hidden=9, seed=0)),  # an argument "omitted" before
        dict(model=spec("two_layer_cnn", filters=4, hidden=8, seed=1)),
        dict(steps=4),
        dict(data_seed=1),
        dict(x=tiny[0] + 1e-6),
    ):
        assert not _train(tiny, **change).hit, change


def test_keep_stores_the_asked_states_and_the_init_is_a_copy_from_before_training(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    net = spec("two_layer_cnn", filters=4, hidden=8, seed=0)
    both = _train(tiny, model=net, keep=["init", "trained"]).states
    layer = _train(tiny, model=net, keep=["first_layer"]).states  # another key, the same CPU run
    assert set(both) == {"init", "trained"} and set(layer) == {"first_layer"}
    fresh = net.build().state_dict()
    assert fresh.keys() == both["init"].keys()
    assert all(torch.equal(fresh[k], both["init"][k]) for k in fresh)  # not the trained tensors under another name
    assert not torch.equal(both["trained"]["conv.weight"], both["init"]["conv.weight"])  # training moved it
    assert layer["first_layer"].keys() == {"weight", "bias"}
    assert all(torch.equal(layer["first_layer"][k], both["trained"][f"conv.{k}"]) for k in ("weight", "bias"))


def test_asking_for_more_seeds_reuses_the_runs_already_made(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    runs = lambda seeds: [
        _train(tiny, model=spec("two_layer_cnn", filters=4, hidden=8, seed=s))  # noqa: E731
        for s in seeds
    ]
    runs([0, 1])
    assert [r.hit for r in runs([0, 1, 2])] == [True, True, False]


def test_probe_contents_are_part_of_the_key(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    eye = torch.eye(27, dtype=torch.float64)
    p1 = FirstLayerMisalignment({"data": eye}, every=1)
    p2 = FirstLayerMisalignment({"data": eye.flip(1)}, every=1)
    assert not _train(tiny, model=spec("two_layer_cnn", filters=32, hidden=8, seed=0), probes=[p1]).hit
    assert _train(tiny, model=spec("two_layer_cnn", filters=32, hidden=8, seed=0), probes=[p1]).hit
    assert not _train(tiny, model=spec("two_layer_cnn", filters=32, hidden=8, seed=0), probes=[p2]).hit


def test_a_look_up_reads_weights_only_when_asked_and_recomputes_unreadable_ones(tmp_path, monkeypatch):
    calls, loads = [], []
    key = C.run_key(lr=0.3)
    C.cached_run(key, _fn(calls, 2.0), root=tmp_path)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    hit = C.cached_run(key, _fn(calls, 2.0), root=tmp_path)
    assert hit.history == {"acc": [2.0]} and loads == []  # the history alone reads no weights
    assert torch.equal(hit.states["w"], torch.full((2,), 2.0)) and len(loads) == 1
    (hit.path / "states.pt").write_bytes(b"not a checkpoint")
    again = C.cached_run(key, _fn(calls, 2.0), root=tmp_path)
    assert again.source == "cache" and len(calls) == 1
    assert torch.equal(again.states["w"], torch.full((2,), 2.0)) and len(calls) == 2  # recomputed on access
