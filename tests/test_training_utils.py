import os

import pytest

from pole_hf.training import checkpoint_step, latest_checkpoint


def test_latest_checkpoint_orders_by_step_number(tmp_path):
    for name in ("checkpoint_9", "checkpoint_10", "checkpoint_2.partial", "checkpoint_x", "other"):
        os.makedirs(tmp_path / name)
    assert os.path.basename(latest_checkpoint(str(tmp_path))) == "checkpoint_10"
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_checkpoint_step_refuses_other_names():
    assert checkpoint_step("/runs/a/checkpoint_12/") == 12
    with pytest.raises(ValueError, match="checkpoint_100"):
        checkpoint_step("/runs/a/step_12")
