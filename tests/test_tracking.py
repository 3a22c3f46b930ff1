import os

import pytest

from normexp.tracking import Tracker

from conftest import tensorboard_values

@pytest.mark.parametrize("status, expected", [
    ("completed", "STATUS_SUCCESS"), ("diverged", "STATUS_FAILURE"),
    ("failed", "STATUS_FAILURE"), ("interrupted", "STATUS_UNKNOWN")])
def test_hparams_session_ends_with_the_run_status(tmp_path, status, expected):
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    tracker = Tracker(str(tmp_path), tensorboard=True)
    tracker.hparams({"optim.lr": 3e-3, "model.placement": "pre"})
    tracker.end_session(status)
    tracker.close()
    values = tensorboard_values(str(tmp_path))
    assert len(values["_hparams_/experiment"]) == 1
    (start,) = values["_hparams_/session_start_info"]
    data = HParamsPluginData.FromString(start.metadata.plugin_data.content)
    assert data.session_start_info.hparams["model.placement"].string_value == "pre"
    (end,) = values["_hparams_/session_end_info"]
    assert end.metadata.plugin_data.plugin_name == "hparams"
    data = HParamsPluginData.FromString(end.metadata.plugin_data.content)
    assert data.WhichOneof("data") == "session_end_info"
    assert Status.Name(data.session_end_info.status) == expected


def test_close_does_not_end_the_session(tmp_path):
    # A run killed before train.py ends the session shows as running, not as a success.
    tracker = Tracker(str(tmp_path), tensorboard=True)
    tracker.hparams({"optim.lr": 3e-3})
    tracker.close()
    values = tensorboard_values(str(tmp_path))
    assert "_hparams_/session_start_info" in values
    assert "_hparams_/session_end_info" not in values


def test_a_tracker_without_tensorboard_ends_no_session(tmp_path):
    tracker = Tracker(str(tmp_path), tensorboard=False)
    tracker.hparams({"optim.lr": 3e-3})
    tracker.end_session("completed")
    tracker.close()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def wandb_records(run_dir):
    """The records of a run's offline wandb file (a LevelDB-style log of protobuf records in
    32 KiB blocks: 4-byte checksum, 2-byte length, 1-byte kind)."""
    import glob
    import struct
    from wandb.proto import wandb_internal_pb2
    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    raw, pos, records, part = open(path, "rb").read(), 7, [], b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):  # full, or the last piece of a split record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
    return records


def test_wandb_offline_logs_the_metrics_config_and_status(tiny, tmp_path):
    import json
    from normexp.rundir import read_metrics
    from normexp.train import run
    run(tiny("log.wandb.mode=offline", "run.name=w"))
    run_dir = tmp_path / "run"
    history, summary, config, exits = {}, {}, {}, []
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in record.history.item}
            history[row.pop("_step")] = row
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            assert record.run.display_name == "w"
        elif kind == "exit":
            exits.append(record.exit.exit_code)
    logged = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(history) == sorted(logged)  # every logged step, the final evaluation too
    for step, record in logged.items():
        for key, value in record.items():
            if key != "step":
                assert history[step][key] == pytest.approx(value, rel=1e-6), (step, key)
    assert config["model.d_model"] == 32 and config["log.wandb.mode"] == "offline"
    assert summary["status"] == "completed" and exits == [0]


def test_wandb_group_is_the_sweeps_name_and_missing_wandb_is_one_line(tmp_path, monkeypatch):
    import sys
    from normexp.config import WandbConfig
    from normexp.errors import UsageError
    from normexp.tracking import require_wandb, wandb_group
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "sweep.json").write_text("{}")
    assert wandb_group(tmp_path / "study" / "run1", WandbConfig()) == "study"
    assert wandb_group(tmp_path / "lone", WandbConfig()) is None
    assert wandb_group(tmp_path / "study" / "r", WandbConfig(group="mine")) == "mine"
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    require_wandb(WandbConfig())  # off: not needed
    with pytest.raises(UsageError, match=r"log.wandb.mode=offline: needs the wandb package "
                                         r"\(pip install 'normexp\[wandb\]'\)"):
        require_wandb(WandbConfig(mode="offline"))


def test_a_vectorized_group_gets_one_wandb_run_each(tmp_path):
    import json
    from normexp.config import load
    from normexp.rundir import read_metrics
    from normexp.train import run_group
    from conftest import TINY
    cfgs = [load(None, TINY + [f"run.out_dir={tmp_path / str(s)}", f"run.seed={s}",
                               "log.wandb.mode=offline"]) for s in (0, 1)]
    run_group(cfgs)
    losses = []
    for s in (0, 1):
        rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
                 for i in r.history.item}
                for r in wandb_records(tmp_path / str(s))
                if r.WhichOneof("record_type") == "history"]
        logged = read_metrics(tmp_path / str(s) / "metrics.jsonl")
        assert [row["_step"] for row in rows] == [r["step"] for r in logged]
        losses.append([row.get("loss") for row in rows])
    assert losses[0] != losses[1]  # each its own run, not one run logged twice
