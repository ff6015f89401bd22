"""Pieces every accelerate training script of the package shares: atomic, pickle-free checkpoints, resuming, the
run's first log line, and splitting a global batch across processes.

A checkpoint is `accelerator.save_state` (optimizer, scheduler, sampler and RNG states, loaded back by accelerate with
`torch.load(weights_only=True)`, which runs no code) plus one `{name}.safetensors` per module the script owns that
is not wrapped by `accelerator.prepare` (e.g. the prompt learner). `accelerator.register_for_checkpointing` is not
used: accelerate loads those objects with `weights_only=False`, so a crafted `custom_checkpoint_0.pkl` would run
code on resume; `load_checkpoint` refuses a checkpoint that only has such files.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import shutil
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from .data.spec import ExampleReader
from .image_processing_pole import PoleImageProcessor

__all__ = [
    "PixelDataset",
    "add_run_arguments",
    "check_trackers",
    "checkpoint_step",
    "epoch_batches",
    "latest_checkpoint",
    "load_checkpoint",
    "log_run_start",
    "process_share",
    "prune_checkpoints",
    "save_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint_"
logger = logging.getLogger(__name__)


class PixelDataset(torch.utils.data.Dataset):
    """Training images resized to `size` and normalised, with their sorted class indices and (with a `class_words`
    column) each pair's word, decoded lazily (memory stays flat). Items are `(pixels, labels, words)`.

    An unreadable image is logged, counted in `skipped` and stands in as a black image without labels, so it adds
    no (image, class) pair while every process keeps the same number of batches.

    Args:
        dataset: a `datasets.Dataset` from `pole_hf.data`.
        size: `(height, width)` of the pixels (without `augment`, or when an image cannot be read).
        mean, std: per-channel normalisation (`(0, 0, 0)`, `(1, 1, 1)` keeps [0, 1]).
        augment: a callable `(pixels [3, H, W] in [0, 1], epoch, index) -> pixels` (e.g.
            `pole_hf.augmentation.ScaleFlipCrop`) applied to each image at its own size before normalisation;
            its output size must equal `size`. The epoch comes from [`set_epoch`].
    """

    def __init__(self, dataset, size: tuple[int, int], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), augment=None):
        self.reader = ExampleReader(dataset)
        self.words = dataset["class_words"] if "class_words" in dataset.column_names else None
        self.size, self.mean, self.std = tuple(size), mean, std
        self.processor = PoleImageProcessor(image_mean=mean, image_std=std, patch_size=1)
        self.unit = PoleImageProcessor(image_mean=(0.0,) * 3, image_std=(1.0,) * 3, patch_size=1)  # [0, 1] pixels
        self.augment, self.epoch = augment, 0
        self.skipped: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        """The epoch the augmentation draws for (call before each epoch's batches, resumed runs included)."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, index):
        example = self.reader[index]
        if example.image is None:
            logger.warning("skipping %s: %s", example.id, example.error)
            self.skipped.append(example.id)
            return torch.zeros(3, *self.size), [], []
        words = list(self.words[index]) if self.words is not None else []
        if self.augment is None:
            pixels = self.processor.pixel_values(example.image, self.size)[0]
            return pixels, example.targets, words
        width, height = example.image.size
        pixels = self.augment(self.unit.pixel_values(example.image, (height, width))[0], self.epoch, index)
        if tuple(pixels.shape[-2:]) != self.size:
            raise ValueError(f"the augmentation gave {tuple(pixels.shape[-2:])} pixels, not size={self.size}: "
                             "give a crop of that size")
        mean = torch.as_tensor(self.mean, dtype=pixels.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=pixels.dtype).view(-1, 1, 1)
        return (pixels - mean) / std, example.targets, words


def _module_file(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name}.safetensors")


def save_checkpoint(accelerator, output_dir: str, step: int, modules: Mapping[str, torch.nn.Module] | None = None
                    ) -> str:
    """`save_state` into `checkpoint_{step}.partial`, add the modules' safetensors, then rename it into place.

    A kill never leaves a partial `checkpoint_{step}`; an existing `checkpoint_{step}` (a rerun) is replaced.

    Args:
        accelerator: the run's `Accelerator` (every process calls this).
        output_dir: the run's output folder.
        step: the optimizer step the state belongs to; the folder is `checkpoint_{step}`.
        modules: modules outside `accelerator.prepare` to store as `{name}.safetensors` (tensors only).

    Returns:
        The checkpoint folder.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    partial = final + ".partial"
    if accelerator.is_main_process and os.path.isdir(partial):
        shutil.rmtree(partial)  # left by a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in (modules or {}).items():
            state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
            save_file(state, _module_file(partial, name))
        if os.path.isdir(final):
            stale = final + ".old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str, modules: Mapping[str, torch.nn.Module] | None = None) -> int:
    """Restore a checkpoint written by `save_checkpoint` and return its step; nothing in it is unpickled.

    Raises:
        ValueError: the folder is not a `checkpoint_{step}` folder, lacks a module's safetensors file (e.g. a
            checkpoint of an older version that pickled the prompt learner), or a file does not fit its module.
    """
    step = checkpoint_step(path)
    pickles = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "custom_checkpoint_*.pkl")))
    if pickles:
        raise ValueError(f"checkpoint {path} holds {', '.join(pickles)}, pickled state that pole_hf never loads "
                         "(unpickling can run code): resume from a checkpoint written by this version")
    for name in modules or {}:
        if not os.path.isfile(_module_file(path, name)):
            raise ValueError(f"checkpoint {path} has no {name}.safetensors: resume from a checkpoint written with the "
                             "same settings by this version, or start without --resume_from_checkpoint")
    try:
        accelerator.load_state(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"checkpoint {path} could not be loaded ({first}); only plain tensors and numbers are "
                         "read (torch.load weights_only=True): resume from an intact checkpoint") from None
    for name, module in (modules or {}).items():
        state = load_file(_module_file(path, name), device="cpu")
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"{_module_file(path, name)} does not fit the model being trained ({first}): resume "
                             "with the same settings the checkpoint was written with") from None
    return step


def checkpoint_step(path: str) -> int:
    """The step of a `checkpoint_{step}` folder; a one-line error for any other name."""
    name = os.path.basename(os.path.normpath(path))
    number = name[len(CHECKPOINT_PREFIX):]
    if not name.startswith(CHECKPOINT_PREFIX) or not number.isdigit():
        raise ValueError(f"{path!r} is not a checkpoint folder: expected a name like 'checkpoint_100'")
    return int(number)


def latest_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint_{step}` folder with the highest step in `output_dir`, or None."""
    if not os.path.isdir(output_dir):
        return None
    found = [d for d in os.listdir(output_dir)
             if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return os.path.join(output_dir, max(found, key=checkpoint_step)) if found else None


def prune_checkpoints(output_dir: str, keep: int) -> list[str]:
    """Delete all but the `keep` newest `checkpoint_{step}` folders of `output_dir` (keep <= 0 keeps all).

    Returns:
        The deleted folders.
    """
    if keep <= 0 or not os.path.isdir(output_dir):
        return []
    found = sorted((d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX)
                    and d[len(CHECKPOINT_PREFIX):].isdigit()), key=checkpoint_step)
    removed = [os.path.join(output_dir, d) for d in found[:-keep]]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                    "swanlab": ("swanlab",), "trackio": ("trackio",)}


def add_run_arguments(parser) -> None:
    """The options every training script shares: checkpoints and resuming, mixed precision, seed, tracker, CPU."""
    parser.add_argument("--checkpointing_steps", type=int, default=0, help="save_state every N steps")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report_to", default=None, help="accelerate tracker, e.g. tensorboard")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")


def check_trackers(report_to) -> None:
    """Refuse, before any work, a `--report_to` tracker whose package is not installed (one line naming it).

    Args:
        report_to: None, a tracker name, a comma-separated list, "all", or tracker objects (not checked).
    """
    import importlib.util

    if not isinstance(report_to, str) or report_to in ("", "all", "none"):
        return
    for name in (part.strip() for part in report_to.split(",") if part.strip()):
        packages = TRACKER_PACKAGES.get(name)
        if packages is None:
            raise ImportError(f"--report_to {name!r} is not a tracker accelerate knows: use one of "
                              f"{sorted(TRACKER_PACKAGES)}")
        if not any(importlib.util.find_spec(package) for package in packages):
            raise ImportError(f"--report_to {name} needs the {packages[0]} package, which is not installed: "
                              f"pip install {packages[0]}")


def log_run_start(logger: logging.Logger, accelerator, script: str) -> str:
    """Log (and return) the run's first line: the script, the number of processes, the distributed type, device."""
    line = (f"{script}: {accelerator.num_processes} process(es), distributed type "
            f"{accelerator.distributed_type.value}, device {accelerator.device}, "
            f"mixed precision {accelerator.mixed_precision}")
    if accelerator.is_main_process:
        logger.info(line)
    return line


def record_step(accelerator, progress, history: list, logs: dict, step: int) -> None:
    """One optimizer step's logs: kept in `history`, sent to the trackers, shown on the progress bar."""
    history.append(logs)
    accelerator.log(logs, step=step)
    progress.update(1)
    progress.set_postfix(loss=f"{logs['loss']:.3f}")


def process_share(batch_size: int, accelerator) -> slice:
    """This process's part of a global batch of `batch_size` items, split by position (ranks first to last).

    Every process reads the whole global batch and keeps its slice, so an uneven last batch is split without the
    duplicated samples accelerate pads with; a process may get no item (its loss is then 0, and it still takes part
    in every collective call).
    """
    return _share(batch_size, accelerator.process_index, accelerator.num_processes)


def _share(size: int, rank: int, world: int) -> slice:
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, process_index: int = 0,
                  num_processes: int = 1) -> list[list[int]]:
    """This process's share of every global batch of one epoch: the same shuffled global batches for any number of
    processes (a permutation seeded by `seed` and `epoch`), each split by position as [`process_share`] splits.

    The last global batch may be smaller; a process whose part is empty still gets an (empty) entry, so every
    process runs the same number of steps. accelerate's `split_batches` sampler orders batches differently for
    different process counts and drops a process's share of an uneven last batch, which this avoids.
    """
    generator = torch.Generator().manual_seed(int(seed) * 100003 + int(epoch))
    order = torch.randperm(num_items, generator=generator).tolist()
    batches = (order[start:start + batch_size] for start in range(0, num_items, batch_size))
    return [batch[_share(len(batch), process_index, num_processes)] for batch in batches]
