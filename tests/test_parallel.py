import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT, TINY

# Runs in a fresh interpreter: the host platform's device count is fixed when jax starts.
SCRIPT = '''
import json, sys
import jax
from normexp.config import load
from normexp.errors import UsageError
from normexp.tracking import read_metrics
from normexp.train import run, run_group
tiny, out = json.loads(sys.argv[1]), sys.argv[2]
result = {"devices": jax.device_count()}
def cfg(name, *extra):
    return load(None, tiny + [f"run.out_dir={out}/{name}", *extra])
for kind in ("layernorm", "batchnorm"):
    for mode in ("off", "auto"):
        name = f"{kind}-{mode}"
        summary = run(cfg(name, f"model.norm.kind={kind}", f"train.data_parallel={mode}"))
        result[name] = {"devices": summary["devices"],
                        "metrics": read_metrics(f"{out}/{name}/metrics.jsonl")}
group = run_group([cfg(f"group{s}", f"run.seed={s}") for s in (0, 1)])
result["group"] = [s["devices"] for s in group]
single = run(cfg("seed1", "run.seed=1", "train.data_parallel=off"))
result["group1"] = read_metrics(f"{out}/group1/metrics.jsonl")
result["seed1"] = read_metrics(f"{out}/seed1/metrics.jsonl")
try:
    run(cfg("odd", "train.batch_size=6"))
except UsageError as e:
    result["odd"] = str(e)
print(json.dumps(result))
'''


def test_data_parallel_over_four_devices_equals_one_device(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["devices"] == 4
    for kind in ("layernorm", "batchnorm"):  # batch statistics pool over the global batch
        one, four = result[f"{kind}-off"], result[f"{kind}-auto"]
        assert (one["devices"], four["devices"]) == (1, 4)
        # Under BatchNorm the biases feeding a norm have a zero gradient up to rounding, which
        # Adam scales up to lr-sized steps: the running means (so val losses) follow that noise.
        assert_close(one["metrics"], four["metrics"],
                     val_rtol=1e-4 if kind == "layernorm" else 1e-3)
    assert result["group"] == [4, 4]  # a vectorized group splits each member's batch too
    assert_close(result["seed1"], result["group1"])
    assert result["odd"].startswith("train.batch_size: 6 sequences do not split evenly over 4 "
                                    "devices")


def assert_close(a, b, val_rtol=1e-4):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key, rtol in (("loss", 1e-4), ("grad_norm", 1e-4), ("val_loss", val_rtol)):
            if key in ra:
                np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, err_msg=key)
