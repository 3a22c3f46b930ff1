import os

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_the_analysis_notebook_executes_on_a_tiny_sweep(study, tmp_path, monkeypatch):
    """On the session's finished sweep (conftest.study), which it only reads."""
    before = sorted(os.walk(study.out_dir))
    monkeypatch.setenv("NORMEXP_SWEEP", study.out_dir)
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "analysis.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 7  # 2 loss curves, 2 gradient profiles, 2 heatmaps, 1 divergence map
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "8 runs in" in printed and "['model.placement', 'optim.lr']" in printed
    assert sorted(os.walk(study.out_dir)) == before  # other tests read the same sweep
