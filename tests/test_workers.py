import os

import pytest

from normexp import sweep as sweep_lib
from normexp import workers

from conftest import write_sweep


def test_workers_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    assert workers.worker_cores(2) == [{0, 1}, {2, 3, 4}]
    assert workers.worker_cores(5) == [{0}, {1}, {2}, {3}, {4}]
    assert workers.worker_cores(6) == [None] * 6  # fewer cores than workers: not pinned


def test_a_worker_pins_itself_to_the_cores_its_parent_chose(monkeypatch):
    pinned = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(cores),
                        raising=False)
    monkeypatch.setenv("NORMEXP_CORES", "2,3")
    workers.pin()
    monkeypatch.setenv("NORMEXP_CORES", "")  # more workers than cores: left unpinned
    workers.pin()
    assert pinned == [{2, 3}]


class Started(Exception):
    pass


def started_slots(monkeypatch, sweep, k):
    """The environments run_workers would start its workers with."""
    from normexp import scheduler
    from normexp.stop import StopRequests

    def record(slots, args):
        raise Started(slots)

    monkeypatch.setattr(workers, "Pool", record)
    share = scheduler.Share(sweep.units())
    with pytest.raises(Started) as started:
        workers.run_workers(sweep, share, k, scheduler.View(share, False), StopRequests(),
                            wait=True)
    return started.value.args[0]


def test_no_more_workers_than_units_with_work(tmp_path, monkeypatch):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}, seeds=2,
                                       vectorize="seeds"))
    # one vectorized group: a second worker would only hold a core
    assert len(started_slots(monkeypatch, sweep, 2)) == 1
    plain = sweep_lib.load(write_sweep(tmp_path, "p", grid={"optim.lr": [1e-3, 2e-3]},
                                       out_dir=str(tmp_path / "p")))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [e["NORMEXP_CORES"] for e in started_slots(monkeypatch, plain, 2)] == ["0", "1"]


def test_a_worker_gets_the_parents_configs_not_the_sweep_file(tmp_path):
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}, seeds=3, vectorize="seeds")
    sweep = sweep_lib.load(path, settings=[("optim.lr", [1e-3, 3e-3]),
                                           ("model.qk_norm", "per_head")])
    for unit in sweep.units():
        line = workers.encode([r.cfg for r in unit])
        assert line.endswith("\n") and "\n" not in line[:-1]
        assert workers.decode(line) == [r.cfg for r in unit]
    with open(path, "w") as f:  # an edit after the parent loaded it changes nothing
        f.write("grid: {optim.lr: [0.5]}\n")
    unit = sweep.units()[0]
    assert workers.decode(workers.encode([r.cfg for r in unit])) == [r.cfg for r in unit]


def test_each_worker_gets_its_share_of_the_gpus():
    eight = [str(i) for i in range(8)]
    assert workers.worker_gpus(8, eight) == [([str(i)], 1) for i in range(8)]
    assert workers.worker_gpus(2, eight) == [(eight[:4], 1), (eight[4:], 1)]
    assert workers.worker_gpus(3, ["0", "1"]) == [(["0"], 2), (["1"], 1), (["0"], 2)]
    assert workers.worker_gpus(2, []) == [([], 2), ([], 2)]  # one accelerator shared, or none


def test_a_workers_environment_names_its_gpus_and_memory_share(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert workers.worker_env({0}, ["3"], 1) == {"NORMEXP_CORES": "0",
                                                 "CUDA_VISIBLE_DEVICES": "3"}
    assert workers.worker_env(None, ["0", "1"], 1)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert workers.worker_env(None, ["0"], 2)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")  # the user's own is kept
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in workers.worker_env(None, [], 4)


def test_visible_gpus_from_the_environment_or_the_device_files(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert workers.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert workers.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(workers.glob, "glob", lambda pattern: [
        "/dev/nvidia10", "/dev/nvidiactl", "/dev/nvidia2", "/dev/nvidia-uvm", "/dev/nvidia0"])
    assert workers.visible_gpus() == ["0", "2", "10"]


def test_eight_workers_on_an_eight_gpu_host_get_one_gpu_each(tmp_path, monkeypatch):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3]},
                                       seeds=2))
    monkeypatch.setattr(workers, "visible_gpus", lambda: [str(i) for i in range(8)])
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    envs = started_slots(monkeypatch, sweep, 8)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == [str(i) for i in range(8)]
    assert not any("XLA_PYTHON_CLIENT_MEM_FRACTION" in e for e in envs)
