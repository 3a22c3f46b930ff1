import os
import subprocess
import sys

import pytest

from normexp import allocator

from conftest import normexp


def test_choices_map_to_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "LIBRARY_DIRS", [str(tmp_path)])
    assert allocator.environment_for("system", {}) == ("system", {})
    name, env = allocator.environment_for("auto", {"GLIBC_TUNABLES": "glibc.x=1"})
    assert name == "glibc-hugetlb"  # no library in the searched directories
    assert env == {"GLIBC_TUNABLES": "glibc.x=1:glibc.malloc.hugetlb=1"}
    (tmp_path / "libjemalloc.so.2").write_text("")
    name, env = allocator.environment_for("auto", {"LD_PRELOAD": "/other.so"})
    assert name == "jemalloc" and env["LD_PRELOAD"] == f"{tmp_path}/libjemalloc.so.2 /other.so"
    assert "dirty_decay_ms:-1" in env["MALLOC_CONF"]
    (tmp_path / "libtcmalloc_minimal.so.4").write_text("")
    name, env = allocator.environment_for("auto", {})
    assert name == "tcmalloc" and env["TCMALLOC_RELEASE_RATE"] == "0"
    assert allocator.environment_for("jemalloc", {})[0] == "jemalloc"
    with pytest.raises(ValueError, match="expected one of auto, tcmalloc"):
        allocator.environment_for("hoard", {})


def test_mimalloc_after_jemalloc_before_the_tunable(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "LIBRARY_DIRS", [str(tmp_path)])
    (tmp_path / "libmimalloc.so.3").write_text("")
    name, env = allocator.environment_for("auto", {})
    assert name == "mimalloc" and env["LD_PRELOAD"] == f"{tmp_path}/libmimalloc.so.3"
    assert env["MIMALLOC_PURGE_DELAY"] == "-1"
    (tmp_path / "libjemalloc.so.2").write_text("")
    assert allocator.environment_for("auto", {})[0] == "jemalloc"
    assert allocator.environment_for("mimalloc", {})[0] == "mimalloc"


def test_the_mimalloc_wheel_is_found_where_it_is_installed():
    if allocator.find_library(allocator.LIBRARIES["mimalloc"][0]) is None:
        pytest.skip("cmeel-mimalloc is not installed here (it is on x86-64 Linux)")
    assert allocator.environment_for("mimalloc", {})[1]["LD_PRELOAD"].endswith(".so.3")


def test_reexec_applies_the_allocator_before_start():
    code = ("import os; from normexp.allocator import reexec_with_fast_allocator as r; r(); "
            "print(os.environ['NORMEXP_ALLOCATOR_ACTIVE'], os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMEXP_ALLOCATOR")}
    env["NORMEXP_ALLOCATOR"] = "glibc-hugetlb"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["glibc-hugetlb", "glibc.malloc.hugetlb=1"], out.stderr
    env["NORMEXP_ALLOCATOR"] = "system"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["system", "None"], out.stderr


def test_unknown_allocator_is_a_usage_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMEXP_ALLOCATOR")}
    result = normexp("train", "--help", env={**env, "NORMEXP_ALLOCATOR": "hoard"})
    assert result.returncode == 2 and "NORMEXP_ALLOCATOR='hoard'" in result.stderr
