"""examples/train_cam_network.py under accelerate: 1 and 2 processes agree (uneven last batch), kills resume exactly,
per-pair words reach training, errors are one line."""

import os
import subprocess
import sys

import pytest
import torch
from launch import kill_and_resume, run_script
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_cam_network.py")
# 9 images in global batches of 4: the last batch has one image, so the second process's part of it is empty
COMMON = ["--dataset", "synthetic", "--num_images", "9", "--train_batch_size", "4", "--image_size", "64", "--cpu"]


def run(args, processes=1, wait=True):
    return run_script(SCRIPT, args, processes, wait, env={"PYTHONPATH": os.path.join(ROOT, "src")})


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_one_and_two_processes_agree_with_an_uneven_last_batch(tmp_path):
    # a moderate rate: at high rates the random tiny network's weights grow fast and amplify the summation-order
    # differences of the gradient all-reduce (and CBS's threshold can flip a pair in or out)
    args = [*COMMON, "--stage", "clims", "--variant", "coop", "--max_train_steps", "3", "--learning_rate", "0.001"]
    one = run([*args, "--output_dir", str(tmp_path / "one")])
    two = run([*args, "--output_dir", str(tmp_path / "two")], processes=2)
    assert one.stdout.startswith("train_cam_network: 1 process(es), distributed type NO")
    assert two.stdout.startswith("train_cam_network: 2 process(es), distributed type MULTI_CPU")
    # the reference augmentation, scaled to the 64-px images, runs by default (per-image draws: same in both)
    assert "augmentation: long side 40-80, flip, crop 64" in two.stdout.splitlines()[0]
    assert_same(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-4)
    context = [load_file(str(tmp_path / n / "prompts" / "model.safetensors"))["prompt_learner.context"]
               for n in ("one", "two")]
    torch.testing.assert_close(context[0], context[1], atol=1e-5, rtol=0)


def test_killed_run_resumes_at_the_same_step_and_data_position(tmp_path):
    args = [*COMMON, "--stage", "classification", "--max_train_steps", "14", "--checkpointing_steps", "2"]
    run([*args, "--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    kill_and_resume(run, args, killed)
    assert_same(weights(killed), weights(tmp_path / "straight"), atol=1e-6)


def test_pole_variant_needs_per_pair_words_and_errors_are_one_line(tmp_path):
    command = [sys.executable, SCRIPT, *COMMON, "--variant", "pole", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
    assert result.returncode == 2 and "--variant pole needs --selection" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = subprocess.run([*command, "--selection", str(bad)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), HF_HUB_OFFLINE="1"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("train_cam_network.py: error: not a class-word selection")


def test_selection_words_are_written_with_the_dataset_per_pair():
    from pole_hf.data import load_synthetic
    from pole_hf.selection import SelectionResult, WordChoice, with_pair_words

    data = load_synthetic(num_images=3, seed=0, image_size=32)
    names = data.features["labels"].feature.names
    choices = [WordChoice(i, None, names[c], f"w{i}{c}", {f"w{i}{c}": 1.0})
               for i, labels in enumerate(data["labels"]) for c in sorted(set(labels))]
    result = SelectionResult(candidates={n: [] for n in names}, choices=choices)
    written = with_pair_words(data, result)
    assert written["class_words"] == [[f"w{i}{c}" for c in sorted(set(ls))] for i, ls in enumerate(data["labels"])]
    with pytest.raises(ValueError, match="no word for image 0"):
        with_pair_words(data, SelectionResult(candidates={}, choices=choices[1:]))


def test_cli_camnet_route_runs_the_packaged_loop(tmp_path, monkeypatch):
    from pole_hf import PoleCamNetwork
    from pole_hf.cli import main

    monkeypatch.setenv("PYTHONPATH", os.path.join(ROOT, "src"))
    out = tmp_path / "camnet"
    assert main(["train", "--route", "camnet", "--", *COMMON, "--stage", "classification", "--max_train_steps", "1",
                 "--output_dir", str(out)]) == 0
    assert PoleCamNetwork.from_pretrained(out).config.class_names[0] == "zebra"


@pytest.mark.parametrize("learn,tokens_move,context_moves", [("context", False, True), ("class_tokens", True, False)])
def test_train_pole_learns_the_context_alone_or_the_class_tokens_alone(tmp_path, learn, tokens_move, context_moves):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_pole
    finally:
        sys.path.pop(0)
    from pole_hf import PolePromptModel
    from pole_hf.bundled import TINY_CLIP
    from pole_hf.data import SyntheticWorld

    world = SyntheticWorld()
    start = PolePromptModel.from_clip(TINY_CLIP, class_names=world.class_names, learn_context=True,
                                      background_words=world.background_kinds)
    train_pole.main(["--dataset", "synthetic", "--num_images", "4", "--train_batch_size", "4", "--max_train_steps",
                     "2", "--learning_rate", "0.05", "--learn", learn, "--output_dir",
                     str(tmp_path), "--cpu"])
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    moved = {name: f"prompt_learner.{name}" in saved and not torch.equal(
        saved[f"prompt_learner.{name}"], getattr(start.prompt_learner, name).detach())
        for name in ("class_tokens", "context")}
    assert moved == {"class_tokens": tokens_move, "context": context_moves}
