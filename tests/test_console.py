"""What a run says while it runs: the start lines, one line per log step off a terminal, the
end line."""

from normexp.console import count_parameters, end_line
from normexp.rundir import Summary

from conftest import cli_in_process, normexp, tiny_args


def test_a_run_in_a_pipe_says_what_runs_then_one_line_per_log_step(tmp_path):
    out = tmp_path / "run"
    done = cli_in_process("train", *tiny_args(out), "log.progress=true", "log.every=4")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr
    assert lines[0].startswith(f"{out}: ") and "parameters (" in lines[0]
    for part in ("without embeddings", "1 x cpu", "float32", "attention einsum",
                 "custom_grads on", "async checkpoints off", "allocator "):
        assert part in lines[0], part
    assert lines[1].startswith("  (attention: CPU") and lines[2] == "compiling..."
    assert lines[3].startswith("compiled in ") and lines[3].endswith(" s")
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps == ["1/12", "5/12", "9/12", "12/12"]  # the log steps 0, 4, 8 and the last
    assert done.stdout.startswith(f"{out}: completed, 12 steps, val loss ")
    assert done.stdout.count("\n") == 1 and "tokens/s" in done.stdout


def test_no_lines_with_progress_off(tmp_path):
    done = normexp("train", *tiny_args(tmp_path / "run"))
    assert done.returncode == 0 and done.stderr == ""


def test_the_end_line_reads_as_the_status():
    base = Summary("completed", run_dir="runs/x", steps=300, final_val_loss=2.12345,
                   best_val_loss=2.1, tokens_per_s=28512.3)
    assert end_line(base) == (
        "runs/x: completed, 300 steps, val loss 2.1235, best 2.1000, 28,512 tokens/s")
    assert end_line(base.replace(status="diverged", diverged_step=41, steps=42,
                                 final_val_loss=None)).startswith("runs/x: diverged at step 41, best")
    assert end_line(base.replace(status="interrupted", signal="SIGTERM", steps=7,
                                 final_val_loss=None, best_val_loss=None)) == (
        "runs/x: interrupted (SIGTERM) after 7 steps; continue with --resume, 28,512 tokens/s")


def test_parameters_are_counted_with_and_without_embeddings(tiny):
    from flax import nnx
    from normexp.step import init_state
    _, _, state = init_state(tiny(), 256)
    total, body = count_parameters(state["params"])
    C, T = 32, 16
    assert total - body == 256 * C + T * C
    assert total == sum(v.size for _, v in nnx.to_flat_state(state["params"]))


def test_a_failed_runs_line_says_why_under_the_given_label():
    line = end_line(Summary("failed", run_dir="/x/r", error="OSError: disk full"), label="r")
    assert line == "r: failed, OSError: disk full"
