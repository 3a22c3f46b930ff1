import os

from conftest import normexp


def test_report_writes_markdown_html_and_every_figure(study, tmp_path):
    out = tmp_path / "report"
    done = normexp("report", study.out_dir, "--out", str(out))
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
    missing = normexp("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such run or sweep directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
