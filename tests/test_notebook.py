import os

import nbformat
from nbclient import NotebookClient

from normexp import sweep as sweep_lib

from conftest import ROOT, write_sweep


def test_the_analysis_notebook_executes_on_a_tiny_sweep(tmp_path, monkeypatch):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"model.placement": ["pre", "post"],
                                                       "optim.lr": [3e-3, 1e30]},
                                       seeds=2, vectorize="seeds"))
    assert sweep_lib.run(sweep, progress=False) == 0
    monkeypatch.setenv("NORMEXP_SWEEP", sweep.out_dir)
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "analysis.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 7  # 2 loss curves, 2 gradient profiles, 2 heatmaps, 1 divergence map
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "8 runs in" in printed and "['model.placement', 'optim.lr']" in printed
