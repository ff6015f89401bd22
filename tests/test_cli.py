"""`pole-hf` subcommands run for real; exit codes 0/1/2 with one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
from helpers import random_image
from PIL import Image

from pole_hf.cli import main


def test_help_on_every_subcommand(capsys):
    for command in ("demo", "cam", "select", "train", "eval", "push", "pull"):
        assert main([command, "--help"]) == 0
        assert "usage: pole-hf" in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    assert main(["cam"]) == 2
    assert main(["no-such-command"]) == 2


def test_cam_writes_maps_masks_overlays(world_prompts, tmp_path, capsys):
    image = tmp_path / "img.png"
    random_image(0, 40, 48).save(image)
    assert main(["--quiet", "cam", str(image), "--model", world_prompts, "--labels", "zebra", "dots",
                 "--out", str(tmp_path / "out")]) == 0
    cams = np.load(tmp_path / "out" / "img_cams.npy", allow_pickle=False)
    assert cams.shape == (2, 40, 48)
    assert Image.open(tmp_path / "out" / "img_mask.png").mode == "P"
    assert Image.open(tmp_path / "out" / "img_overlay.png").size == (48, 40)
    assert "zebra" in capsys.readouterr().out


def test_cam_bad_image_is_one_line_exit_1(world_prompts, tmp_path, capsys):
    missing = tmp_path / "missing.jpg"
    assert main(["--quiet", "cam", str(missing), "--model", world_prompts, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.jpg" in err and err.startswith("pole-hf cam: error:")


def test_eval_and_select(world_prompts, tmp_path, capsys):
    result = tmp_path / "eval.json"
    assert main(["--quiet", "eval", "--model", world_prompts, "--dataset", "synthetic", "--num_images", "4",
                 "--out", str(result)]) == 0
    data = json.loads(result.read_text())
    assert 0 <= data["miou"] <= 1 and "background" in data["per_class_iou"]
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps({"zebra": ["zebra", "stripes"], "fence": ["fence", "bars"]}))
    out = tmp_path / "selected"
    assert main(["--quiet", "select", "--model", world_prompts, "--dataset", "synthetic", "--num_images", "6",
                 "--candidates", str(candidates), "--out", str(out)]) == 0
    selection = json.loads((out / "selection.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["class_words"][0] in ("zebra", "stripes") and selection


def test_train_delegates_to_the_script(world_prompts, tmp_path):
    out = tmp_path / "trained"
    assert main(["train", "--", "--dataset", "synthetic", "--num_images", "4", "--prompts", world_prompts,
                 "--max_train_steps", "2", "--train_batch_size", "2", "--output_dir", str(out), "--cpu"]) == 0
    assert (out / "model.safetensors").is_file()


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "pole_hf", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout


def noise_image(path, height=40, width=48, seed=0):
    random_image(seed, height, width).save(path)


def test_cam_same_stem_inputs_keep_distinct_outputs(world_prompts, tmp_path, capsys):
    for folder, name, seed in (("a", "x.png", 0), ("b", "x.png", 1), ("b", "x.jpg", 2)):
        (tmp_path / folder).mkdir(exist_ok=True)
        noise_image(tmp_path / folder / name, height=32 + 8 * seed, seed=seed)
    images = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), str(tmp_path / "b" / "x.jpg")]
    assert main(["cam", *images, "--model", world_prompts, "--labels", "zebra", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    heights = [np.load(tmp_path / "o" / f"{stem}_cams.npy").shape[1] for stem in ("x", "x-2", "x-3")]
    assert heights == [32, 40, 48]
    assert "b/x.jpg -> x-3_*" in capsys.readouterr().out


def test_cam_folder_with_per_image_labels(world_prompts, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image(folder / "p.png")
    noise_image(folder / "q.png", seed=1)
    (folder / "notes.txt").write_text("not an image")
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"file_name": "p.png", "labels": ["zebra"]}\n'
                      '{"file_name": "q.png", "labels": ["dots", "fence"]}\n')
    assert main(["cam", str(folder), "--model", world_prompts, "--labels_file", str(labels), "--device", "cpu",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert [np.load(tmp_path / "o" / f"{n}_cams.npy").shape[0] for n in "pq"] == [1, 2]
    labels.write_text('{"file_name": "p.png", "labels": ["zebra"]}\n')
    assert main(["cam", str(folder), "--model", world_prompts, "--labels_file", str(labels), "--out",
                 str(tmp_path / "o2"), "--quiet"]) == 1
    assert "has no labels for 'q.png'" in capsys.readouterr().err


def test_any_exception_is_one_line_and_debug_shows_the_trace(monkeypatch, capsys):
    import pytest

    import pole_hf.cli as cli

    def boom(args):
        raise IndexError("list index out of range")

    monkeypatch.setattr(cli, "cmd_demo", boom)
    assert main(["demo", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pole-hf demo: error: IndexError: list index out of range")
    with pytest.raises(IndexError):
        main(["demo", "--debug"])


def test_version_and_counts_refused(capsys):
    from pole_hf import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"pole-hf {__version__}"
    assert main(["eval", "--num_images", "0"]) == 2
    assert "0 must be at least 1" in capsys.readouterr().err
