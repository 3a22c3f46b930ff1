import os

from conftest import cli_in_process


def test_report_writes_markdown_html_and_every_figure(study, tmp_path):
    out = tmp_path / "report"
    done = cli_in_process("report", study.out_dir, "--out", str(out))
    assert done.returncode == 0, done.stderr
    files = set(os.listdir(out))
    pngs = {"loss.png", "val_loss.png", "grad_norm_init.png", "grad_norm_final.png",
            "divergence_map.png", *(f"heatmap_{i:02d}.png" for i in range(4))}
    assert files == pngs | {"report.md", "report.html"}
    md = (out / "report.md").read_text()
    assert all(f"]({name})" in md for name in pngs)
    assert "8 runs: 4 completed, 4 diverged" in md
    assert all(r.name in md for r in study.runs)
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = cli_in_process("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such run or sweep directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_report_at_print_resolution_with_vector_figures(study, tmp_path):
    out = tmp_path / "report"
    done = cli_in_process("report", study.out_dir, "--out", str(out), "--dpi", "220",
                          "--format", "svg")
    assert done.returncode == 0, done.stderr
    files = set(os.listdir(out))
    pngs = {f for f in files if f.endswith(".png")}
    assert {f[:-4] + ".svg" for f in pngs} == {f for f in files if f.endswith(".svg")}
    assert (out / "loss.svg").read_text().lstrip().startswith("<?xml")
    width = int.from_bytes((out / "loss.png").read_bytes()[16:20], "big")
    assert width == 2 * 704  # 6.4 inches at 220 dpi, twice the default 110's
    bad = cli_in_process("report", study.out_dir, "--format", "jpg")
    assert bad.returncode == 2


def test_no_divergence_map_where_the_swept_keys_vary_together(study):
    from normexp import analysis
    from normexp.report import figures
    runs = analysis.load_runs(study.out_dir)
    together = runs[((runs["model.placement"] == "pre") & (runs["optim.lr"] == 3e-3))
                    | ((runs["model.placement"] == "post") & (runs["optim.lr"] == 1e30))]
    metrics = analysis.load_metrics(list(together["run_dir"]))
    names = [name for name, *_ in figures(together, metrics)]
    assert "divergence_map.png" not in names and "loss.png" in names
    assert "divergence_map.png" in [name for name, *_ in figures(
        runs, analysis.load_metrics(study.out_dir))]


def test_an_unfinished_sweep_is_reported_with_its_pending_runs_counted(tmp_path, capsys):
    from conftest import tiny_base, write_sweep
    from normexp import cli
    from normexp import sweep as sweep_lib
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]},
                                       base=tiny_base("train.steps=2")))
    assert sweep_lib.run(sweep, shard=(1, 2), progress=False) == 0  # the first run only
    assert cli.main(["report", sweep.out_dir, "--out", str(tmp_path / "report")]) == 0
    assert "2 runs: 1 completed, 1 pending" in (tmp_path / "report" / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(["results", sweep.out_dir]) == 0
    assert "2 runs: 1 completed, 1 pending" in capsys.readouterr().err


def _lr_sweep(logit):
    """A finished lr sweep (3 lrs x qk_norm x 2 seeds) as analysis.load_runs /
    analysis.load_metrics frames: 2 blocks whose max attention logit is logit(qk_norm, step,
    seed, block) at steps 0, 10, 20."""
    import pandas as pd
    runs, rows = [], []
    for lr in (1e-3, 1e-2, 1e-1):
        for qk in (False, True):
            for seed in (0, 1):
                name = f"lr={lr:g},qk={qk},seed={seed}"
                runs.append({"run": name, "status": "completed", "final_val_loss": 3.0 + lr,
                             "initial_loss": 4.2, "optim.lr": lr, "model.qk_norm": qk,
                             "run.seed": seed})
                rows += [(name, step, f"attn/block_{b:02d}/logit_max",
                          logit(qk, step, seed, b), float(b), "attn/block/logit_max")
                         for step in (0, 10, 20) for b in (0, 1)]
    metrics = pd.DataFrame(rows, columns=["run", "step", "metric", "value", "layer", "family"])
    return pd.DataFrame(runs).set_index("run", drop=False), metrics


def test_the_logit_caption_states_what_was_measured_not_what_was_expected():
    from normexp.report import figures
    # a max logit that falls over training without qk-norm (block 1 is the larger one)
    runs, metrics = _lr_sweep(lambda qk, step, seed, b: (2.0 if qk else 8.0) - step / 10
                              + seed + b)
    (caption,) = [c for name, _, c, _ in figures(runs, metrics) if name == "logit_max_00.png"]
    assert "grow" not in caption and "saturat" not in caption
    assert "At optim.lr=0.1:" in caption and "mean over seeds" in caption
    # seed mean of the max over blocks: (8 + 1 + 9 + 1) / 2 = 9.5 at step 0, 7.5 at step 20
    assert ("qk_norm=False: 9.5 at step 0 (the first logged), peak 9.5 at step 0, 7.5 at step "
            "20 (the last)") in caption
    assert "qk_norm=True: 3.5 at step 0 (the first logged), peak 3.5 at step 0" in caption
    # and one that does grow is reported with its numbers, still without a claim of why
    runs, metrics = _lr_sweep(lambda qk, step, seed, b: 1.0 + (0 if qk else step) + b)
    (caption,) = [c for name, _, c, _ in figures(runs, metrics) if name == "logit_max_00.png"]
    assert "qk_norm=False: 2 at step 0 (the first logged), peak 22 at step 20" in caption
    assert "qk_norm=True: 2 at step 0 (the first logged), peak 2 at step 0" in caption
