#!/usr/bin/env python
"""Segmentation on the synthetic world: the same SegFormer trained on (a) ground-truth masks, (b) pseudo masks from
the official class names, (c) pseudo masks from POLE (`pole-hf run`: selected words, then learned class tokens).

    python benchmarks/segmentation_synthetic.py --out /tmp/seg-bench

The three variants run side by side (three processes) with `pole-hf run`'s defaults: the same training images,
steps, batch and seed; val mIoU on held-out val images against ground truth. Prints the table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from pole_hf import PolePromptModel
    from pole_hf.bundled import TINY_CLIP
    from pole_hf.cli import build_parser
    from pole_hf.data import SyntheticWorld
    from pole_hf.run import _base_image_size, stage_commands

    world = SyntheticWorld()
    official = os.path.join(args.out, "official-prompts")
    PolePromptModel.from_clip(TINY_CLIP, class_names=world.class_names,
                              background_words=world.background_kinds).save_pretrained(official)
    run = [sys.executable, "-m", "pole_hf", "--quiet", "run", "--cpu", "--seed", str(args.seed)]
    # (a) ground truth: the run's own segmentation command without --masks
    defaults = build_parser().parse_args(["run", "--cpu", "--seed", str(args.seed)])
    gt_dir = os.path.join(args.out, "gt")
    command = stage_commands(defaults, gt_dir, _base_image_size(defaults))["4_segmentation"]
    masks = command.index("--masks")
    command = [*command[:masks], *command[masks + 2:], "--num_images", "400"]  # the run's synthetic default
    commands = {"ground truth": command,
                "official names": [*run, "--run_dir", os.path.join(args.out, "official"), "--prompts", official],
                "POLE (selected words + learned class tokens)": [*run, "--run_dir", os.path.join(args.out, "pole")]}
    folders = {"ground truth": gt_dir, "official names": os.path.join(args.out, "official"),
               "POLE (selected words + learned class tokens)": os.path.join(args.out, "pole")}
    started, processes, seconds = time.time(), {}, {}
    for name, cmd in commands.items():
        os.makedirs(folders[name], exist_ok=True)
        log = open(os.path.join(folders[name], "bench.log"), "w", encoding="utf-8")
        processes[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (process, log) in processes.items():
        if process.wait():
            raise SystemExit(f"{name} failed: see {log.name}")
        seconds[name] = time.time() - started
        log.close()
    lines = ["| masks | val mIoU | pseudo-mask mIoU (train) | CAM mIoU (val) | train / val images | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    results = {}
    for name, folder in folders.items():
        with open(os.path.join(folder, "4_segmentation", "results.json"), encoding="utf-8") as f:
            seg = json.load(f)
        cam = None
        card = os.path.join(folder, "2_prompts", "README.md")
        if os.path.isfile(card):
            from huggingface_hub import ModelCard

            cam = next((e.metric_value for e in ModelCard.load(card).data.eval_results or []
                        if e.metric_name == "CAM mIoU"), None)
        mask = seg.get("pseudo_mask_miou")
        results[name] = {"val_miou": 100 * seg["val_miou"], "pseudo_mask_miou": None if mask is None else 100 * mask,
                         "cam_miou": cam, "train_images": seg["train_images"], "val_images": seg["val_images"],
                         "seconds": seconds[name]}
        r = results[name]
        lines.append(f"| {name} | {r['val_miou']:.2f} | {'-' if mask is None else f'{100 * mask:.2f}'} | "
                     f"{'-' if cam is None else f'{cam:.2f}'} | {r['train_images']} / {r['val_images']} | "
                     f"{seconds[name]:.0f} |")
    table = "\n".join(lines)
    print(table)
    gt, names, pole = (results[k]["val_miou"] for k in folders)
    print(f"POLE / ground truth = {pole / gt:.3f} (target >= 0.9); POLE - official names = {pole - names:+.2f}")
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
