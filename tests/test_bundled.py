"""The tiny CLIP and the learned prompts shipped in the package, and the offline demo on them."""

import json
import os

import numpy as np
import torch
from transformers import CLIPModel, pipeline

from pole_hf import TINY_CLIP, TINY_PROMPTS, PolePromptModel
from pole_hf.data import SyntheticWorld, load_synthetic


def folder_size(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def test_bundled_clip_loads_in_float32_and_is_small():
    model = CLIPModel.from_pretrained(TINY_CLIP)
    assert model.dtype == torch.float32
    assert folder_size(TINY_CLIP) <= 15 * 2**20
    assert model.config.vision_config.patch_size == 8


def test_bundled_prompts_refer_to_the_bundled_clip():
    config = json.load(open(os.path.join(TINY_PROMPTS, "config.json")))
    assert config["base_model_name_or_path"] is None  # the bundled CLIP, wherever the package is installed
    assert config["class_names"] == SyntheticWorld().class_names
    assert folder_size(TINY_PROMPTS) < 100_000
    model = PolePromptModel.from_pretrained(TINY_PROMPTS)
    assert model.config.class_words != model.config.class_names  # POLE changed some words


def test_bundled_pipeline_localises_objects():
    pipe = pipeline("pole-cam", model=TINY_PROMPTS)
    item = load_synthetic(num_images=1, seed=11, image_size=64, split="test")[0]
    names = SyntheticWorld().class_names
    labels = [names[i] for i in sorted(set(item["labels"]))]
    out = pipe(item["image"], labels=labels)
    truth, predicted = np.asarray(item["mask"]), np.asarray(out["mask"])
    assert (truth == predicted).mean() > 0.6  # far above chance for 1-3 objects on a textured background


def test_demo_runs_offline(tmp_path, capsys):
    from pole_hf.demo import run_demo

    results = run_demo(str(tmp_path), num_images=4, progress=False, selection_images=8)
    assert set(results) == {"official names", "selected words", "learned tokens"}
    for variant in results.values():
        assert 0 <= variant["cam_miou"] <= 100 and 0 <= variant["mask_miou"] <= 100
    assert (tmp_path / "iou.png").is_file() and (tmp_path / "overlay_0.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["table"].startswith("| class |")
    assert "runs offline on the tiny CLIP bundled" in capsys.readouterr().out


def test_demo_pictures_caption_every_tile_and_keep_class_names_whole(tmp_path):
    from PIL import Image, ImageDraw

    from pole_hf.demo import bar_chart, captioned_strip

    rows = {"official names": {"background": 90.0, "chessboard": 40.0}, "selected words": {"background": 91.0,
                                                                                           "chessboard": 70.0}}
    bar_chart(rows, str(tmp_path / "chart.png"), "CAM mIoU")
    chart = Image.open(tmp_path / "chart.png")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert chart.width >= 60 + 2 * probe.textlength("background") + probe.textlength("selected words")
    tile = Image.new("RGB", (16, 16), "red")
    strip = captioned_strip([tile, tile], ["image", "a long variant name"], "labels: dots")
    assert strip.height > 32 and strip.width >= 2 * probe.textlength("a long variant name")
    caption_row = np.asarray(strip)[33:45]
    assert (caption_row < 128).any()  # text was drawn under the tiles


def test_demo_full_adds_the_segmentation_row(tmp_path, capsys, monkeypatch):
    import pole_hf.cam_network_training as training
    from pole_hf.demo import run_demo

    stages, real = [], training.main
    monkeypatch.setattr(training, "main", lambda argv: stages.append(argv) or real(argv))

    small = ["--cpu", "--num_images", "6", "--eval_images", "4", "--seg_config", "tiny", "--seg_steps", "10",
             "--seg_batch_size", "4"]
    camnet = ["--num_images", "8", "--train_batch_size", "4", "--max_train_steps", "2", "--image_size", "64"]
    results = run_demo(str(tmp_path), num_images=4, progress=False, selection_images=8, full=True, run_options=small,
                       camnet_options=camnet)
    networks = ["CAM network (classification)", "CAM network (CLIMS)", "CAM network (POLE)"]
    assert list(results)[-3:] == networks  # the paper's route beside the CLIP-ES variants
    assert all(0 <= results[n]["cam_miou"] <= 100 and "seg_miou" not in results[n] for n in networks)
    assert all(0 <= variant["seg_miou"] <= 100 for name, variant in results.items() if name not in networks)
    out = capsys.readouterr().out
    assert "| **segmentation val mIoU** |" in out and "| CAM network (POLE) |" in out
    for slug in ("official-names", "selected-words", "learned-tokens"):
        assert (tmp_path / "segmentation" / slug / "results.json").is_file()
    # POLE's words are chosen on the CLIMS network's CAMs, then POLE trains from the classification network
    order = [(a[a.index("--stage") + 1], os.path.basename(a[a.index("--output_dir") + 1])) for a in stages]
    assert order == [("classification", "classification"), ("clims", "clims"), ("select", "select"),
                     ("clims", "pole")]
    select = stages[2]
    assert select[select.index("--init_network") + 1] == results["CAM network (CLIMS)"]["network"]
    assert stages[3][stages[3].index("--init_network") + 1] == results["CAM network (classification)"]["network"]
