"""The README names only files that exist, and its code maps name every module. (Its config
reference table is checked in test_config.py, beside the config it documents.)"""

import ast
import glob
import json
import os
import re

import pytest

from conftest import ROOT

README = open(os.path.join(ROOT, "README.md")).read()

# The repository's own directories: a path starting with one of these names a repository file
# (what commands create lies elsewhere: runs/, sweeps/, claims/, a RUNS_DIR, ...).
REPO_DIRS = ("configs", "scripts", "normexp", "notebooks", "docs", "tests")
PATH = re.compile(r"(?<![\w./<>*-])(?:%s)/[\w./<>*-]*" % "|".join(REPO_DIRS))
# A file name without its directory: found among the repository's files of that kind.
BARE = re.compile(r"(?<![\w./<>*-])[\w<>*-]+\.(?:py|sh|ipynb|yaml|yml)\b(?![\w/-])")
BARE_HOMES = ("normexp", "scripts", "tests", "notebooks", "configs", "configs/sweeps")
NOT_REPOSITORY_FILES = {"config.yaml"}  # every run directory's resolved config, an output


def as_glob(path):
    """A README path as a glob: a placeholder such as <placement> or <module> matches any name."""
    return re.sub(r"<[^>]*>", "*", path.rstrip(".,:;"))


def readme_paths():
    return sorted({m.group(0).rstrip(".,:;") for m in PATH.finditer(README)})


def test_every_repository_path_the_readme_names_exists():
    paths = readme_paths()
    assert {"configs/pre_ln.yaml", "configs/sweeps/placement_warmup.yaml", "normexp/budget.py",
            "scripts/figures.sh", "notebooks/analysis.ipynb", "configs/<placement>.yaml",
            "docs/figures/xiong_fig3_quick.png"} <= set(paths), paths
    missing = [p for p in paths if not glob.glob(os.path.join(ROOT, as_glob(p)))]
    assert not missing, f"the README names files that do not exist: {missing}"


def test_every_file_the_readme_names_without_its_directory_exists():
    """`pre_ln.yaml`, `weights.py`, `placement_warmup.yaml`: a bare name is one of ours."""
    names = {m.group(0) for m in BARE.finditer(README)}
    names = {n for n in names if n not in NOT_REPOSITORY_FILES
             and not re.search(r"[<>*]", n) and not n.split(".")[0].isupper()}  # CONFIG.yaml
    assert {"pre_ln.yaml", "lr_sensitivity.yaml", "weights.py", "demo.py"} <= names, names
    ours = {os.path.basename(p) for home in BARE_HOMES
            for p in glob.glob(os.path.join(ROOT, home, "*"))}
    assert not names - ours, f"the README names files that do not exist: {sorted(names - ours)}"


@pytest.mark.parametrize("path", ["configs/sweeps/example.yaml", "normexp/nothing.py",
                                  "docs/figures/none.png", "scripts/gone.sh"])
def test_the_path_check_would_catch_a_missing_file(path):
    """The check above reads paths the way the README writes them, in code and in prose."""
    for text in (f"normexp sweep {path} --dry-run", f"(`{path}`).", f"# {path}\n"):
        found = [m.group(0).rstrip(".,:;") for m in PATH.finditer(text)]
        assert found == [path] and not glob.glob(os.path.join(ROOT, as_glob(path)))
    assert [m.group(0) for m in BARE.finditer(f"run `{os.path.basename(path)}`")] == (
        [os.path.basename(path)] if not path.endswith(".png") else [])


def layout_block():
    """The code block of the README's Layout section."""
    section = README[README.index("\n## Layout\n"):]
    return section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]


def block_lines(block, start, end):
    """The lines of the Layout block from the one starting with `start` to the one before `end`."""
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next(i for i, line in enumerate(lines) if line.startswith(end))
    return "\n".join(lines[first:last])


def modules():
    return {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "normexp", "*.py"))
            if not p.endswith("__init__.py")}


def test_the_layout_names_every_module_and_script_and_nothing_else():
    block = layout_block()
    listed = set(re.findall(r"(\w+)\.py\b", block_lines(block, "normexp/", "notebooks/")))
    assert listed == modules(), (f"missing from Layout: {sorted(modules() - listed)}; "
                                 f"no such module: {sorted(listed - modules())}")
    scripts = set(re.findall(r"\w+\.(?:py|sh)\b", block_lines(block, "scripts/", "tests/")))
    assert scripts == set(os.listdir(os.path.join(ROOT, "scripts"))) - {"__pycache__"}


def imports_of(module):
    """The normexp modules `module` imports when it is imported (not inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, "normexp", f"{module}.py")).read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normexp"):
            found |= ({a.name for a in node.names} if node.module == "normexp"
                      else {node.module.split(".")[1]})
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("normexp.")}
    return found & modules()


def test_the_short_code_map_lists_modules_in_import_order():
    """'How the code is laid out' says a module imports none listed after it."""
    section = README[README.index("\n## How the code is laid out\n"):]
    section = section[:section.index("\n## ", 1)]
    order = re.findall(r"`(\w+)\.py`", section)
    assert len(order) >= 20 and set(order) <= modules(), set(order) - modules()
    for i, module in enumerate(order):
        later = imports_of(module) & set(order[i:])
        assert not later, f"{module} imports {sorted(later)}, listed after it"


def summary_table():
    """{key: meaning} of the README's table of summary.json's keys."""
    section = README[README.index("\n## The run directory\n"):]
    section = section[:section.index("\n### ", 1)]
    return dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", section, re.M))


def test_the_summary_table_lists_the_keys_a_run_writes(tiny, tmp_path):
    """The record's keys in its order; a completed run writes all but the four only some
    runs have."""
    from normexp.rundir import SUMMARY_KEYS
    from normexp.train import run
    run(tiny("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    table = summary_table()
    assert list(table) == list(SUMMARY_KEYS)
    only_some = {"signal", "error", "history", "resumed_at"}
    assert set(summary) == set(table) - only_some, sorted(summary)
    assert summary["status"] == "completed"
    for key in ("data_fingerprint", "norms"):  # the sub-keys the table names
        named = set(re.findall(r"`(\w+)`", table[key])) - {"data_fingerprint", "norms"}
        assert named <= set(summary[key]) and named, (key, named, summary[key])
