"""`pole-hf run`: the four stages end in a segmentation model; a killed run resumes at its stage and step."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
SMALL = ["--cpu", "--num_images", "8", "--select_images", "4", "--prompt_steps", "2", "--eval_images", "4",
         "--seg_config", "tiny", "--seg_steps", "150", "--seg_batch_size", "4", "--checkpointing_steps", "2"]


def command(run_dir):
    return [sys.executable, "-m", "pole_hf", "--quiet", "run", "--run_dir", str(run_dir), *SMALL]


def test_killed_run_resumes_at_its_stage_and_step(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(run_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    checkpoint = run_dir / "4_segmentation" / "checkpoint_4"
    deadline = time.time() + 400
    while not checkpoint.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its stage's process, as a killed job
    process.wait()
    assert checkpoint.is_dir(), process.stderr.read().decode()[-2000:]
    assert not (run_dir / "4_segmentation" / "stage.json").exists()
    assert all((run_dir / stage / "stage.json").is_file() for stage in ("1_select", "2_prompts", "3_cams"))

    result = subprocess.run(command(run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("1_select", "2_prompts", "3_cams"):
        assert f"pole-hf run: {stage} already complete, skipped" in result.stdout
    assert "pole-hf run: 4_segmentation resumed" in result.stdout
    log = (run_dir / "4_segmentation" / "log.txt").read_text()
    assert "resumed from" in log and "checkpoint_" in log
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["val_miou"] <= 100 and results["pseudo_mask_miou"] is not None
    assert "| segmentation val mIoU |" in result.stdout

    from pole_hf.segmentation import load_pseudo_masks

    masks = load_pseudo_masks(str(run_dir / "3_cams"))  # stage 2's output as a datasets.Dataset
    assert len(masks) == 8 and {"image", "labels", "mask", "gt_mask", "image_id"} <= set(masks.column_names)
    row = masks[0]
    assert row["mask"].size == row["image"].size
    values = set(np.unique(np.asarray(row["mask"])).tolist())
    assert values <= {0, 255, *(i + 1 for i in row["labels"])}
