import json

import pytest

from conftest import cli_in_process, normexp


def test_quick_bench_produces_every_figure():
    """Checks the benchmark runs and reports everything; never a timing (see the README)."""
    result = normexp("bench", "--quick")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    for key in ("compile_seconds", "ms_per_step", "ms_per_step_no_stats", "tokens_per_s",
                "grad_norm_overhead_pct", "ms_per_step_activations", "activations_overhead_pct",
                "activations_every_step_overhead_pct", "ms_per_step_attention",
                "attention_overhead_pct", "attention_every_step_overhead_pct"):
        assert isinstance(r["step"][key], (int, float)), key
    assert r["step"]["memory"]["temp_mib"] > 0
    assert {"ms_per_step_real_data", "ms_per_step_fixed_batch", "difference_pct"} <= r[
        "data"].keys()
    t = r["throughput"]
    assert t["flops_per_token"] > 0 and t["matmul_gflops_per_s"] > 0
    # both GFLOP/s figures are rounded to 0.1 before they are printed
    assert 0 < t["fraction_of_matmul_peak"] == pytest.approx(
        t["model_gflops_per_s"] / t["matmul_gflops_per_s"], abs=0.005)
    # no peak in the table for a CPU: MFU is against the measured matmul, and says so
    assert t["peak"].startswith("the measured matmul") and "not in the table" in t["peak"]
    assert t["mfu"] == pytest.approx(t["fraction_of_matmul_peak"], abs=0.005)
    assert t["flop_count"].startswith("6 N + 12 L C T") and t["dtype"] == "float32"
    assert r["remat"]["memory"]["temp_mib"] > 0 and "step_time_pct" in r["remat"]
    assert [row["n_layer"] for row in r["depth"]["rows"]] == [2, 4]
    assert all(row["compile_seconds"] > 0 for row in r["depth"]["rows"])
    assert "compile_ratio_deepest_to_shallowest" in r["depth"]
    c = r["compile_cache"]
    assert c["cold_compile_seconds"] > 0 and c["warm_compile_seconds"] > 0
    assert r["machine"]["allocator"] in ("tcmalloc", "jemalloc", "mimalloc", "glibc-hugetlb",
                                         "system")


def test_bench_rejects_bad_arguments():
    result = cli_in_process("bench", "--depths", "4,x", "--quick")
    assert result.returncode == 2 and "--depths '4,x'" in result.stderr
    result = cli_in_process("bench", "--steps", "0")
    assert result.returncode == 2 and "expected a positive integer" in result.stderr
