"""Pieces every accelerate training script of the package shares: atomic checkpoints and finding the latest one."""

from __future__ import annotations

import os

__all__ = ["checkpoint_step", "latest_checkpoint", "prune_checkpoints", "save_checkpoint"]

CHECKPOINT_PREFIX = "checkpoint_"


def save_checkpoint(accelerator, output_dir: str, step: int) -> str:
    """`save_state` into a temporary folder, renamed when complete: a kill never leaves a partial checkpoint.

    Args:
        accelerator: the run's `Accelerator` (every process calls this).
        output_dir: the run's output folder.
        step: the optimizer step the state belongs to; the folder is `checkpoint_{step}`.

    Returns:
        The checkpoint folder.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    partial = final + ".partial"
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


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
    found = [d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return os.path.join(output_dir, max(found, key=checkpoint_step)) if found else None


def prune_checkpoints(output_dir: str, keep: int) -> list[str]:
    """Delete all but the `keep` newest `checkpoint_{step}` folders of `output_dir` (keep <= 0 keeps all).

    Returns:
        The deleted folders.
    """
    import shutil

    if keep <= 0 or not os.path.isdir(output_dir):
        return []
    found = sorted((d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX)
                    and d[len(CHECKPOINT_PREFIX):].isdigit()), key=checkpoint_step)
    removed = [os.path.join(output_dir, d) for d in found[:-keep]]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed
