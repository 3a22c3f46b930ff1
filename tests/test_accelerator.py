"""The accelerator check in quick mode: every field produced on CPU (no timing asserted)."""

import json
import os

from normexp import accelerator

from conftest import normexp


def test_quick_check_produces_every_field_on_two_host_devices(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2")
    done = normexp("bench", "--accelerator", "--quick", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r == json.loads(done.stdout)
    assert r["platform"] == "cpu" and r["local_devices"] == 2 and r["quick"]
    assert r["flop_count"].startswith("6 N + 12 L C T") and r["matmul_gflops_per_s"] > 0
    variants = {(v["attention"], v["custom_grads"]): v for v in r["gpt2_small"]["variants"]}
    assert sorted(variants) == [("cudnn", "off"), ("cudnn", "on"), ("xla", "off"), ("xla", "on")]
    for custom in ("on", "off"):  # no cuDNN here: said, not measured
        assert "cuDNN needs an NVIDIA GPU" in variants["cudnn", custom]["skipped"]
        v = variants["xla", custom]
        assert v["kernels"] == {"attention": "xla", "custom_grads": custom == "on"}
        for key in ("compile_seconds", "ms_per_step", "tokens_per_s", "model_gflops_per_s",
                    "peak_gflops_per_s", "mfu", "fraction_of_matmul_peak"):
            assert v[key] > 0, key
        assert "not in the table" in v["peak"] and v["memory"]["planned_mib"] > 0
        assert v["memory"]["device_peak_mib_so_far"] is None  # a CPU reports none
    s = r["vectorized_seeds"]
    assert s["runs"] == 8 and s["train_steps"] == 600 and s["shape"]["d_model"] == 64
    assert s["runs_per_hour_one_by_one"] > 0 and s["runs_per_hour_vectorized"] > 0
    assert s["speedup"] > 0 and s["memory_group"]["planned_mib"] > s["memory_one_run"][
        "planned_mib"]
    d = r["data_parallel"]
    assert d["devices"] == 2 and d["tokens_per_s_all_devices"] > 0
    assert 0 < d["scaling_efficiency"] and d["memory_all_devices"]["planned_mib"] > 0


def test_sections_stop_starting_once_the_budget_is_spent():
    r = accelerator.check(quick=True, budget_s=0)
    assert all(v["skipped"] == "time budget spent" for v in r["gpt2_small"]["variants"])
    assert r["vectorized_seeds"] == r["data_parallel"] == {"skipped": "time budget spent"}
