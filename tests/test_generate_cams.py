"""examples/generate_cams.py: outputs, resumption, bad images skipped, 2-process sharding, SIGKILL safety."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from launch import run_script
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "generate_cams.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")



def launch(args, processes=1, wait=True):
    if not wait:
        return run_script(SCRIPT, args, processes=processes, wait=False)
    run_script(SCRIPT, args, processes=processes)
    return json.loads(open(os.path.join(args[args.index("--output_dir") + 1], "summary.json")).read())


def outputs(folder):
    cams = {f: np.load(os.path.join(folder, "cams", f), allow_pickle=False)
            for f in sorted(os.listdir(os.path.join(folder, "cams")))}
    masks = {f: np.asarray(Image.open(os.path.join(folder, "masks", f)))
             for f in sorted(os.listdir(os.path.join(folder, "masks")))}
    return cams, masks


def test_outputs_resume_and_two_processes(world_prompts, tmp_path):
    args = ["--model", world_prompts, "--dataset", "synthetic", "--num_images", "8"]
    one = launch([*args, "--output_dir", str(tmp_path / "one")])
    assert one["computed"] == 8 and one["skipped"] == 0 and 0 <= one["miou"] <= 1
    cams, masks = outputs(tmp_path / "one")
    assert len(cams) == 8 and len(masks) == 8
    first = cams["000000.npy"]
    assert first.dtype == np.float16 and first.ndim == 3
    os.remove(tmp_path / "one" / "cams" / "000003.npy")
    again = launch([*args, "--output_dir", str(tmp_path / "one")])
    assert (again["resumed"], again["computed"]) == (7, 1) and again["miou"] == pytest.approx(one["miou"])
    two = launch([*args, "--output_dir", str(tmp_path / "two")], processes=2)
    assert two["computed"] == 8 and two["miou"] == pytest.approx(one["miou"], abs=1e-6)
    cams_two, masks_two = outputs(tmp_path / "two")
    assert sorted(cams_two) == sorted(cams)
    for name in cams:
        np.testing.assert_allclose(cams_two[name].astype(np.float32), cams[name].astype(np.float32), atol=2e-3)
    assert sorted(masks_two) == sorted(masks)
    for name in masks:  # the same pseudo masks, up to pixels where two classes' maps tie within float noise
        assert (masks_two[name] == masks[name]).mean() > 0.995, name


def test_bad_images_are_logged_and_skipped(world_prompts, tmp_path):
    from pole_hf.data import SyntheticWorld

    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    names = SyntheticWorld().class_names
    with open(folder / "metadata.jsonl", "w") as f:
        for name in ("a.png", "b.png", "broken.png", "empty.jpg"):
            f.write(json.dumps({"file_name": name, "labels": [names[0]]}) + "\n")
    summary = launch(["--model", world_prompts, "--dataset", f"imagefolder:{folder}",
                      "--output_dir", str(tmp_path / "out")])
    assert summary["computed"] == 2 and summary["skipped"] == 2


def test_sigkill_then_resume_matches_a_straight_run(world_prompts, tmp_path):
    # batch 1: the resumed run's batches then hold the same images as the straight run's, so the fp16 files are
    # bit-identical (batches of other compositions agree to float rounding, see test_image_processing)
    args = ["--model", world_prompts, "--dataset", "synthetic", "--num_images", "60", "--refine", "--batch_size", "1"]
    launch([*args, "--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    process = launch([*args, "--output_dir", str(killed)], wait=False)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if (killed / "masks").is_dir() and len(os.listdir(killed / "masks")) >= 10:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    launch([*args, "--output_dir", str(killed)])
    cams, masks = outputs(tmp_path / "straight")
    cams_k, masks_k = outputs(killed)
    assert sorted(cams_k) == sorted(cams) and sorted(masks_k) == sorted(masks)  # no temporary leftovers
    for name in cams:
        np.testing.assert_array_equal(cams_k[name], cams[name])
    for name in masks:
        np.testing.assert_array_equal(masks_k[name], masks[name])


def imagefolder(folder, rows):
    """An image folder whose metadata.jsonl has one row per (file, image_id)."""
    from pole_hf.data import SyntheticWorld

    folder.mkdir()
    rng = np.random.default_rng(1)
    names = SyntheticWorld().class_names
    with open(folder / "metadata.jsonl", "w") as f:
        for index, (file_name, image_id) in enumerate(rows):
            Image.fromarray(rng.integers(0, 255, (24 + 8 * index, 32, 3), dtype=np.uint8)).save(folder / file_name)
            f.write(json.dumps({"file_name": file_name, "image_id": image_id, "labels": [names[0]]}) + "\n")


def test_hostile_and_repeated_ids_stay_inside_and_distinct(world_prompts, tmp_path):
    victim = tmp_path / "victim"
    imagefolder(tmp_path / "data", [("a.png", "../../victim/important"), ("b.png", "/abs/id"), ("c.png", "dup"),
                                    ("d.png", "dup")])
    out = tmp_path / "deep" / "out"
    summary = launch(["--model", world_prompts, "--dataset", f"imagefolder:{tmp_path / 'data'}",
                      "--output_dir", str(out)])
    assert summary["computed"] == 4 and summary["resumed"] == 0
    assert not victim.exists() and not (tmp_path / "deep" / "victim").exists()
    assert sorted(os.listdir(out / "masks")) == ["abs__id.png", "dup-2.png", "dup.png", "victim__important.png"]
    heights = {np.load(out / "cams" / f"{stem}.npy").shape[1] for stem in ("dup", "dup-2")}
    assert heights == {40, 48}  # two different images, both written


def test_rerun_with_other_settings_is_refused_or_recomputed(world_prompts, tmp_path):
    args = ["--model", world_prompts, "--dataset", "synthetic", "--num_images", "3", "--output_dir", str(tmp_path)]
    launch(args)
    command = [sys.executable, SCRIPT, "--cpu", *args, "--refine"]
    refused = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1
    assert "other settings (refine: False -> True): pass --overwrite" in refused.stderr.strip().splitlines()[-1]
    summary = launch([*args, "--refine", "--overwrite"])
    assert (summary["computed"], summary["resumed"]) == (3, 0)
    assert launch([*args, "--refine"])["resumed"] == 3


def test_pushed_dataset_holds_its_images_labels_and_masks(world_prompts, tmp_path, local_hub):
    import datasets

    from pole_hf.data import SyntheticWorld

    out = tmp_path / "out"
    run_script(SCRIPT, ["--model", world_prompts, "--dataset", "synthetic", "--num_images", "3", "--output_dir",
                        str(out), "--push_to_hub", f"{local_hub.user}/cam-masks"], env=dict(os.environ))
    pushed = datasets.load_dataset(f"{local_hub.user}/cam-masks", split="train")
    assert len(pushed) == 3 and {"image", "labels", "mask"} <= set(pushed.column_names)
    assert pushed.features["labels"].feature.names == SyntheticWorld().class_names
    row = pushed[0]
    assert row["image"].size == row["mask"].size  # real pixels in the repo, no paths to files that were not uploaded
    assert not [c for c in pushed.column_names if c.endswith(("_file", "_path"))]
