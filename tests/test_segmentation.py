"""WSSS stage 3: a tiny SegFormer on pseudo masks: loss falls, 255 is ignored, the saved folder runs in
`pipeline("image-segmentation")`, 1 and 2 processes agree, a SIGKILLed run resumes exactly, the card validates."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from launch import kill_and_resume, run_script
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_segmentation.py")
TINY = ["--cpu", "--config_name", "tiny", "--eval_images", "4", "--image_size", "32"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def run(args, processes=1, wait=True):
    return run_script(SCRIPT, [*TINY, *args], processes, wait, env=ENV, launcher="torchrun")


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_loss_falls_and_the_folder_runs_in_the_pipeline(tmp_path):
    from transformers import pipeline

    from pole_hf.data import SyntheticWorld, load_synthetic
    from pole_hf.segmentation.train import main

    out = tmp_path / "seg"
    result = main([*TINY, "--num_images", "4", "--train_batch_size", "4", "--max_train_steps", "12",
                   "--learning_rate", "0.01", "--scale_range", "1", "1", "--output_dir", str(out)])
    losses = [h["loss"] for h in result["history"]]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    segmenter = pipeline("image-segmentation", model=str(out))
    image = load_synthetic(1, split="val", image_size=32)[0]["image"]
    segments = segmenter(image)
    names = {"background", *SyntheticWorld().class_names}
    assert segments and {s["label"] for s in segments} <= names
    assert all(s["mask"].size == image.size for s in segments)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["0"] == "background" and config["id2label"]["1"] == "zebra"
    assert (out / "preprocessor_config.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert 0 <= saved["val_miou"] <= 1 and saved["val_images"] == 4


def test_ignored_pixels_add_nothing_to_the_loss():
    from pole_hf.segmentation.train import pixel_loss

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, :2] = 255
    loss = pixel_loss(logits, labels, int((labels != 255).sum()), 1)
    loss.backward()
    assert logits.grad[0, :, :2].abs().sum() == 0 and logits.grad[0, :, 2:].abs().sum() > 0
    changed = logits.detach().clone()
    changed[0, :, :2] += 100.0  # any prediction on ignored pixels
    again = pixel_loss(changed, labels, int((labels != 255).sum()), 1)
    torch.testing.assert_close(again, loss.detach())
    blank = pixel_loss(logits, torch.full((2, 4, 4), 255), 0, 1)
    assert blank.item() == 0.0


def test_augmented_crops_pad_with_ignore_and_follow_the_seed():
    from pole_hf.data import load_synthetic
    from pole_hf.segmentation import SegmentationTrainSet, build_segmentation_model

    data = load_synthetic(3, image_size=32)
    _, processor = build_segmentation_model(["a"] * 0 + list("abcdefgh"), config_name="tiny", image_size=32)
    train = SegmentationTrainSet(data, processor, crop_size=48, scale_range=(0.5, 0.6), seed=3)
    image, mask = train[0]
    assert image.shape == (48, 48, 3) and mask.shape == (48, 48)
    assert (mask == 255).mean() > 0.5  # the small rescaled image is padded with ignored pixels
    np.testing.assert_array_equal(train[0][1], mask)
    train.epoch = 1
    assert not np.array_equal(train[0][1], mask)
    pixels, labels = train.collate([train[0], train[1]])
    assert pixels.shape == (2, 3, 48, 48) and labels.dtype == torch.int64


def test_one_and_two_processes_agree_with_an_uneven_last_batch(tmp_path):
    # 9 images, global batch 4: batches of 4, 4 and 1, the last one leaving the second process without images
    args = ["--num_images", "9", "--train_batch_size", "4", "--max_train_steps", "6", "--learning_rate", "0.01",
            "--adam_epsilon", "1e-4"]
    run([*args, "--output_dir", str(tmp_path / "one")])
    two = run([*args, "--output_dir", str(tmp_path / "two")], processes=2)
    assert "train_segmentation: 2 process(es), distributed type MULTI_CPU" in two.stderr
    one, other = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = weights_at_start(tmp_path)
    assert max((one[k].float() - start[k].float()).abs().max().item() for k in one) > 1e-2  # training moved them
    for key in one:
        torch.testing.assert_close(one[key], other[key], atol=1e-4, rtol=1e-4, msg=key)


def weights_at_start(tmp_path):
    """The weights both runs start from (seed 0), saved as the script saves them."""
    from accelerate.utils import set_seed

    from pole_hf.data import SyntheticWorld
    from pole_hf.segmentation import build_segmentation_model

    set_seed(0)
    model, _ = build_segmentation_model(SyntheticWorld().class_names, config_name="tiny", image_size=32)
    model.save_pretrained(tmp_path / "start")
    return weights(tmp_path / "start")


def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    args = ["--num_images", "12", "--train_batch_size", "4", "--max_train_steps", "30", "--checkpointing_steps", "2",
            "--learning_rate", "0.01"]
    run([*args, "--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    resumed = kill_and_resume(run, args, killed)
    assert "resumed from" in resumed.stderr
    assert len([d for d in os.listdir(killed) if d.startswith("checkpoint_")]) == 2  # older ones pruned
    straight, again = weights(tmp_path / "straight"), weights(killed)
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], atol=1e-6, rtol=0, msg=key)


def test_bad_batch_size_is_one_line(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, *TINY,
               "--num_images", "4", "--train_batch_size", "3", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "train_segmentation: error: --train_batch_size 3 is not a multiple of the 2 processes" in result.stderr


def test_card_names_the_mask_source_and_validates(local_hub, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import get_session, hf_raise_for_status

    from pole_hf.hub import render_segmentation_card
    from pole_hf.segmentation import build_segmentation_model

    model, _ = build_segmentation_model(["cat", "dog"], config_name="tiny", image_size=32)
    card = render_segmentation_card(model, dataset="voc2012", val_miou=61.25, val_images=1449,
                                    pseudo_mask_miou=70.5, masks_from="me/voc-prompts", repo_id="me/voc-segformer",
                                    training={"steps": 100})
    response = get_session().post(f"{local_hub.endpoint}/api/validate-yaml", headers={"Accept": "text/plain"},
                                  json={"repoType": "model", "content": str(card)})
    hf_raise_for_status(response)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    values = {e.metric_name: (e.metric_value, e.dataset_split) for e in loaded.data.eval_results}
    assert values == {"Segmentation mIoU": (61.25, "val"), "Pseudo-mask mIoU": (70.5, "train")}
    assert "me/voc-prompts" in loaded.text and 'pipeline("image-segmentation", model="me/voc-segformer")' in loaded.text
    assert "0 background, 1 cat, 2 dog" in loaded.text


def test_push_to_hub_uploads_a_pipeline_ready_repo(local_hub, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    from pole_hf.segmentation.train import main

    main([*TINY, "--num_images", "4", "--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "1",
          "--output_dir", str(tmp_path / "seg"), "--push_to_hub", "seg"])
    repo = f"{local_hub.user}/seg"
    files = set(HfApi().list_repo_files(repo))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "results.json"} <= files
    assert not any(name.startswith("checkpoint_") for name in files)
    card = ModelCard.load(repo)
    assert card.data.pipeline_tag == "image-segmentation" and f'model="{repo}"' in card.text
