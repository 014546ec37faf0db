import json

import pytest
import torch

from common import cache as C


def _fn(counter, value=1.0):
    def fn(scratch):
        counter.append(scratch)
        return {"acc": [value]}, {"w": torch.full((2,), value)}
    return fn


def test_miss_then_hit(tmp_path):
    calls = []
    cfg = {"lr": 0.1, "seeds": [0, 1], "model": {"name": "cnn", "width": 2}}
    r1 = C.cached_run(cfg, _fn(calls), root=tmp_path)
    assert not r1.hit and len(calls) == 1
    r2 = C.cached_run(dict(reversed(list(cfg.items()))), _fn(calls), root=tmp_path)  # key order irrelevant
    assert r2.hit and len(calls) == 1 and r2.history == {"acc": [1.0]}
    assert torch.equal(r2.states["w"], torch.ones(2))
    assert json.loads((r1.path / "config.json").read_text()) == cfg


def test_any_config_change_misses(tmp_path):
    calls = []
    C.cached_run({"lr": 0.1, "seed": 0}, _fn(calls), root=tmp_path)
    C.cached_run({"lr": 0.1, "seed": 1}, _fn(calls), root=tmp_path)
    C.cached_run({"lr": 0.2, "seed": 0}, _fn(calls), root=tmp_path)
    assert len(calls) == 3


def test_version_bump_misses(tmp_path, monkeypatch):
    calls = []
    C.cached_run({"a": 1}, _fn(calls), root=tmp_path)
    monkeypatch.setattr(C, "CACHE_VERSION", "999")
    C.cached_run({"a": 1}, _fn(calls), root=tmp_path)
    assert len(calls) == 2


def test_force_recomputes(tmp_path):
    calls = []
    C.cached_run({"a": 1}, _fn(calls, 1.0), root=tmp_path)
    r = C.cached_run({"a": 1}, _fn(calls, 2.0), root=tmp_path, force=True)
    assert not r.hit and r.history == {"acc": [2.0]}
    assert C.cached_run({"a": 1}, _fn(calls, 3.0), root=tmp_path).history == {"acc": [2.0]}


def test_interrupted_run_leaves_no_complete_entry_and_keeps_scratch(tmp_path):
    seen = []

    def failing(scratch):
        (scratch / "ckpt.pt").write_text("partial")
        seen.append(scratch)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.cached_run({"b": 2}, failing, root=tmp_path)
    key = C.config_hash({"b": 2})
    assert not (tmp_path / key).exists()
    assert (tmp_path / f"{key}.partial" / "ckpt.pt").is_file()  # resume material survives

    def resume(scratch):
        assert (scratch / "ckpt.pt").read_text() == "partial"
        return {"ok": True}, {}

    r = C.cached_run({"b": 2}, resume, root=tmp_path)
    assert r.history == {"ok": True} and not (tmp_path / f"{key}.partial").exists()
