"""examples/train_pole.py under accelerate: loss goes down, 1 and 2 processes agree, kills resume exactly."""

import os
import re
import subprocess
import sys

import pytest
import torch
from launch import kill_and_resume, run_script
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_pole.py")


@pytest.fixture(scope="module")
def world_base(tmp_path_factory):
    """A random tiny CLIP at 64 px whose tokenizer knows the synthetic world's words."""
    from pole_hf.data import SyntheticWorld
    from pole_hf.tiny import build_tiny_clip, default_words

    world = SyntheticWorld()
    words = default_words() + [piece for ws in world.candidates.values() for w in ws for piece in w.split()]
    path = tmp_path_factory.mktemp("world-clip")
    build_tiny_clip(str(path), image_size=64, words=words + world.background_kinds)
    return str(path)


def import_script():
    """examples/train_pole.py as a module, to call its functions in this process."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import train_pole
    finally:
        sys.path.pop(0)
    return train_pole


def run(args, processes=1, env=None, wait=True):
    return run_script(SCRIPT, args, processes=processes, wait=wait, env=env)


def tokens(folder):
    return load_file(os.path.join(folder, "model.safetensors"))["prompt_learner.class_tokens"]


COMMON = ["--dataset", "synthetic", "--num_images", "16", "--train_batch_size", "4", "--learning_rate", "0.01"]


def test_loss_goes_down_in_process(world_base, tmp_path):
    train_pole = import_script()
    result = train_pole.main(["--dataset", "synthetic", "--num_images", "4", "--train_batch_size", "4",
                              "--base", world_base, "--output_dir", str(tmp_path), "--max_train_steps", "8",
                              "--learning_rate", "0.01", "--cpu"])
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[1]  # the same batch every step: the prompts learn it
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "README.md")
    assert "weakly-supervised-semantic-segmentation" in (tmp_path / "README.md").read_text()


def test_one_and_two_processes_agree(world_base, tmp_path):
    start = torch.zeros(1)
    run([*COMMON, "--base", world_base, "--output_dir", str(tmp_path / "one"), "--max_train_steps", "3"])
    run([*COMMON, "--base", world_base, "--output_dir", str(tmp_path / "two"), "--max_train_steps", "3"],
        processes=2)
    one, two = tokens(tmp_path / "one"), tokens(tmp_path / "two")
    assert not torch.equal(one, start)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-4)


def test_killed_run_resumes_to_the_same_tokens(world_base, tmp_path):
    args = [*COMMON, "--base", world_base, "--max_train_steps", "24", "--checkpointing_steps", "2"]
    run([*args, "--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    resumed = kill_and_resume(run, args, killed)
    assert re.search(r"resumed from checkpoint_(\d+) at step \1\b", resumed.stderr)
    assert "done: 24 steps, final loss" in resumed.stderr
    torch.testing.assert_close(tokens(killed), tokens(tmp_path / "straight"), atol=1e-6, rtol=0)


def test_uneven_last_batch_two_processes_agree_with_one(world_base, tmp_path):
    # 5 images in global batches of 4: the second batch has one image, which only rank 0 gets
    args = ["--dataset", "synthetic", "--num_images", "5", "--train_batch_size", "4", "--learning_rate", "0.01",
            "--base", world_base, "--max_train_steps", "2"]
    run([*args, "--output_dir", str(tmp_path / "one")])
    run([*args, "--output_dir", str(tmp_path / "two")], processes=2)
    torch.testing.assert_close(tokens(tmp_path / "one"), tokens(tmp_path / "two"), atol=1e-6, rtol=1e-5)


class Payload:
    """Unpickling this writes a marker file: proof that a pickle in a checkpoint was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def resume_fails(args, checkpoint):
    command = [sys.executable, SCRIPT, "--cpu", *args, "--resume_from_checkpoint", str(checkpoint)]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert failed.returncode == 1, failed.stderr[-2000:]
    return failed.stderr.strip().splitlines()[-1]


def test_resume_never_unpickles_a_planted_payload(world_base, tmp_path):
    args = [*COMMON, "--base", world_base, "--output_dir", str(tmp_path), "--max_train_steps", "3",
            "--checkpointing_steps", "2"]
    run(args)
    checkpoint = tmp_path / "checkpoint_2"
    marker = tmp_path / "payload-ran"
    # accelerate would load a custom_checkpoint_0.pkl with weights_only=False: refused before loading
    torch.save(Payload(str(marker)), checkpoint / "custom_checkpoint_0.pkl")
    assert "custom_checkpoint_0.pkl, pickled state that pole_hf never loads" in resume_fails(args, checkpoint)
    os.remove(checkpoint / "custom_checkpoint_0.pkl")
    # the optimizer state is read with weights_only=True: a payload there is refused, not run
    os.replace(checkpoint / "optimizer.bin", tmp_path / "optimizer.bin")
    torch.save({"state": Payload(str(marker))}, checkpoint / "optimizer.bin")
    assert "could not be loaded" in resume_fails(args, checkpoint)
    assert not marker.exists()
    os.replace(tmp_path / "optimizer.bin", checkpoint / "optimizer.bin")
    os.remove(checkpoint / "prompt_learner.safetensors")
    assert "has no prompt_learner.safetensors" in resume_fails(args, checkpoint)


def test_checkpoint_over_an_existing_one_and_bad_step_counts(world_base, tmp_path):
    args = [*COMMON, "--base", world_base, "--output_dir", str(tmp_path), "--max_train_steps", "2",
            "--checkpointing_steps", "2"]
    run(args)
    first = load_file(tmp_path / "checkpoint_2" / "prompt_learner.safetensors")["class_tokens"]
    run([*args[:-4], "--learning_rate", "0.05", "--max_train_steps", "2", "--checkpointing_steps", "2"])
    second = load_file(tmp_path / "checkpoint_2" / "prompt_learner.safetensors")["class_tokens"]
    assert not torch.equal(first, second)  # replaced, not "Directory not empty"
    assert not any(name.endswith((".partial", ".old")) for name in os.listdir(tmp_path))
    for flag in ("--max_train_steps", "--train_batch_size"):
        bad = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "x"), flag, "0"],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and f"{flag} 0 must be at least 1" in bad.stderr


def test_missing_tracker_package_and_eval_split_fail_before_training(world_base, tmp_path):
    bad = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path), "--report_to", "tensorboard"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "pip install tensorboard" in bad.stderr
    bad = subprocess.run([sys.executable, SCRIPT, "--cpu", *COMMON, "--base", world_base, "--output_dir",
                          str(tmp_path), "--eval_split", "nosuch"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "nosuch" in bad.stderr.strip().splitlines()[-1]
    assert "POLE:" not in bad.stderr  # no training step ran


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(world_base, tmp_path):
    # linear warm-up from 0: step 1 moves nothing (a good checkpoint), step 2's huge rate overflows the tokens
    args = [*COMMON[:-2], "--base", world_base, "--output_dir", str(tmp_path), "--max_train_steps", "6",
            "--checkpointing_steps", "1", "--learning_rate", "1e38", "--lr_scheduler_type", "linear",
            "--num_warmup_steps", "1000", "--cpu"]
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    match = re.match(r"train_pole.py: error: the (loss|prompt tensors) became .* at step (\d+): lower", last_line)
    assert match, last_line
    failed = int(match.group(2))
    assert failed >= 2 and not (tmp_path / f"checkpoint_{failed}").exists()
    assert not (tmp_path / "model.safetensors").exists()
    for step in range(1, failed):  # every checkpoint written before the failure is complete and finite
        state = load_file(tmp_path / f"checkpoint_{step}" / "prompt_learner.safetensors")
        assert torch.isfinite(state["class_tokens"]).all()


def test_same_seed_same_tokens(world_base, tmp_path):
    for name in ("a", "b"):
        run([*COMMON, "--base", world_base, "--output_dir", str(tmp_path / name), "--max_train_steps", "3"])
    assert torch.equal(tokens(tmp_path / "a"), tokens(tmp_path / "b"))


def test_loss_terms_and_rate_reach_the_trackers_with_periodic_eval(world_base, tmp_path):
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logged, self.config = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    train_pole = import_script()
    recorder = Recorder()
    args = train_pole.parse_args(["--dataset", "synthetic", "--num_images", "8", "--train_batch_size", "4",
                                  "--base", world_base, "--output_dir", str(tmp_path), "--max_train_steps", "2",
                                  "--eval_split", "test", "--eval_images", "2", "--eval_every", "2", "--cpu"])
    args.report_to = [recorder]
    train_pole.training_function(args)
    steps = [values for _, values in recorder.logged if "loss" in values]
    assert len(steps) == 2 and {"loss", "otm", "btm", "cbs", "lr"} <= set(steps[0])
    assert any("cam_miou" in values for _, values in recorder.logged)
    assert recorder.config["max_train_steps"] == 2
