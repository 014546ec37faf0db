"""The same command on the same machine gives the same numbers: a short training run, repeated in
fresh Python processes, ends with bit-identical weights and history; and malloc keeping freed memory on
the CPU changes the page faults of training, not its numbers."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, json, torch
import common as C
C.reproducible(threads=2)
data = C.fake_cifar10(256, seed=0)
x, _ = C.standardized(data)
y = C.random_labels(256, 10, seed=1)
model = C.two_layer_cnn(filters=16, hidden=16, first_layer_std=0.002, seed=0)
hist = C.train(model, x, y, steps=25, lr=0.05, batch_size=32, data_seed=3, log_every=5,
               eval_sets={"train": (x, y)}, eval_every=10, dev=torch.device("cpu"))
h = hashlib.sha256()
for p in model.parameters():
    h.update(p.detach().numpy().tobytes())
print(json.dumps({"weights": h.hexdigest(), "train": hist["train"], "eval": hist["eval"]}))
"""


# in a fresh process: the same run with glibc's default malloc, then after keep_freed_memory
MALLOC_SCRIPT = r"""
import hashlib, json, resource, sys, torch
import common as C
C.reproducible(threads=2)
data = C.fake_cifar10(256, seed=0)
x, _ = C.standardized(data)
y = C.random_labels(256, 10, seed=1)

def run():  # weights' hash and minor page faults of 8 steps whose activations are 67 MB a batch
    model = C.two_layer_cnn(filters=256, hidden=16, first_layer_std=0.002, seed=0)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    C.train(model, x, y, steps=8, lr=0.05, batch_size=64, data_seed=3, dev=torch.device("cpu"))
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

flag = sys.modules["common.train"]._MALLOC
flag["keeps_freed_memory"] = False  # as if asked already: train leaves glibc's defaults alone
default = run()
flag["keeps_freed_memory"] = None
kept = C.keep_freed_memory()
print(json.dumps({"kept": kept, "default": default, "kept_run": run()}))
"""


def _run(script=SCRIPT):
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"CI": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_is_bit_identical_across_fresh_processes():
    a, b = _run(), _run()
    assert a["weights"] == b["weights"]
    assert a["train"] == b["train"] and a["eval"] == b["eval"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keeping_freed_memory_removes_page_faults_not_numbers():
    r = _run(MALLOC_SCRIPT)
    assert r["kept"] is True
    (w_default, faults_default), (w_kept, faults_kept) = r["default"], r["kept_run"]
    assert w_default == w_kept
    # measured on the dev CPU: about 700k faults with the defaults, 70-90k kept (the first step's heap growth)
    assert faults_kept < faults_default / 4, (faults_default, faults_kept)
