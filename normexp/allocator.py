"""The memory allocator of the process: chosen before it starts, by re-executing it once.

XLA:CPU allocates its per-step work buffers with malloc. Under glibc's allocator the large ones
are mmapped and unmapped every step (~100k page faults a step for the default model, a third of
the step time). tcmalloc, jemalloc or mimalloc, kept from returning memory, or glibc's hugetlb
tunable remove most of that; each acts only if set before the process starts. mimalloc comes
with normexp on x86-64 Linux (the `cmeel-mimalloc` wheel ships `libmimalloc.so`), so the two
make commands get a fast allocator without a system package.

`NORMEXP_ALLOCATOR` picks: `auto` (default: tcmalloc, else jemalloc, else mimalloc, else the
glibc tunable), `tcmalloc`, `jemalloc`, `mimalloc`, `glibc-hugetlb`, or `system` (leave the
process as it is).
"""

import os
import sys
import sysconfig

ACTIVE = "NORMEXP_ALLOCATOR_ACTIVE"  # set in the re-executed process: what it runs with
CHOICES = ("auto", "tcmalloc", "jemalloc", "mimalloc", "glibc-hugetlb", "system")
LIBRARIES = {
    "tcmalloc": (["libtcmalloc_minimal.so.4", "libtcmalloc.so.4"], {"TCMALLOC_RELEASE_RATE": "0"}),
    "jemalloc": (["libjemalloc.so.2"], {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    # never purge freed memory, commit arenas at once: measured ~8% faster than its defaults
    "mimalloc": (["libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"],
                 {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ARENA_EAGER_COMMIT": "1"}),
}
LIBRARY_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib",
                os.path.join(sysconfig.get_paths()["purelib"], "cmeel.prefix", "lib")]


def find_library(names):
    for directory in LIBRARY_DIRS:
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def environment_for(choice, env):
    """(allocator name, variables to add) for a choice; ('system', {}) when nothing applies."""
    if choice not in CHOICES:
        raise ValueError(f"NORMEXP_ALLOCATOR={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return "system", {}
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if choice in ("auto", name):
            names, extra = LIBRARIES[name]
            path = find_library(names)
            if path:
                preload = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
                return name, {"LD_PRELOAD": preload, **extra}
    tunables = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), "glibc.malloc.hugetlb=1") if t)
    return "glibc-hugetlb", {"GLIBC_TUNABLES": tunables}


def reexec_with_fast_allocator():
    """Re-execute this interpreter's command line once under the chosen allocator."""
    if ACTIVE in os.environ:
        return
    choice = os.environ.get("NORMEXP_ALLOCATOR", "auto")
    try:
        name, extra = environment_for(choice, os.environ)
    except ValueError as e:
        print(f"normexp: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    env = {**os.environ, **extra, ACTIVE: name}
    if not extra:
        os.environ[ACTIVE] = name
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def active():
    """The allocator this process runs with, for summaries and benchmarks."""
    return os.environ.get(ACTIVE, "system")
