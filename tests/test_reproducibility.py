"""The same command on the same machine gives the same numbers: a short training run, repeated in
fresh Python processes, ends with bit-identical weights and history."""

import json
import subprocess
import sys

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


def _run():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
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
