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
