#!/usr/bin/env python
"""Segmentation on the synthetic world: the same SegFormer trained on (a) ground-truth masks, (b) pseudo masks from
the official class names, (c) pseudo masks from POLE (`pole-hf run`: selected words, then learned class tokens).

    python benchmarks/segmentation_synthetic.py --out /tmp/seg-bench

Every variant uses the run's defaults (`pole-hf run --help`): same training images, steps, batch, seed; val mIoU on
held-out val images against ground truth. Prints the markdown table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def pole_run(args, run_dir: str, extra=()) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "pole_hf", "--quiet", "run", "--cpu", "--run_dir", run_dir,
                    "--seed", "0", *extra], check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = {}
    # (c) POLE, the whole flow (timed)
    seconds = pole_run(args, os.path.join(args.out, "pole"))
    rows["POLE (selected words + learned class tokens)"] = os.path.join(args.out, "pole")
    # (b) the official class names on the same base, straight to pseudo masks
    from pole_hf import PolePromptModel
    from pole_hf.bundled import TINY_CLIP
    from pole_hf.data import SyntheticWorld

    world = SyntheticWorld()
    official = os.path.join(args.out, "official-prompts")
    PolePromptModel.from_clip(TINY_CLIP, class_names=world.class_names,
                              background_words=world.background_kinds).save_pretrained(official)
    pole_run(args, os.path.join(args.out, "official"), ["--prompts", official])
    rows["official names"] = os.path.join(args.out, "official")
    # (a) ground truth: the run's segmentation command without --masks
    with open(os.path.join(args.out, "pole", "4_segmentation", "stage.json"), encoding="utf-8") as f:
        command = json.load(f)["command"]
    masks = command.index("--masks")
    gt_command = command[:masks] + command[masks + 2:]
    gt_dir = os.path.join(args.out, "gt")
    gt_command[gt_command.index("--output_dir") + 1] = os.path.join(gt_dir, "4_segmentation")
    gt_command += ["--num_images", gt_command_num_images(args.out)]
    os.makedirs(gt_dir, exist_ok=True)
    start = time.time()
    subprocess.run(gt_command, check=True)
    gt_seconds = time.time() - start
    rows = {"ground truth": gt_dir, **{k: rows[k] for k in ("official names",
                                                           "POLE (selected words + learned class tokens)")}}
    lines = ["| masks | val mIoU | pseudo-mask mIoU (train) | CAM mIoU (val) | train / val images | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    results = {}
    for name, folder in rows.items():
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
                         "cam_miou": cam, "train_images": seg["train_images"], "val_images": seg["val_images"]}
        r = results[name]
        took = seconds if name.startswith("POLE") else gt_seconds if name == "ground truth" else None
        lines.append(f"| {name} | {r['val_miou']:.2f} | {'-' if mask is None else f'{100 * mask:.2f}'} | "
                     f"{'-' if cam is None else f'{cam:.2f}'} | {r['train_images']} / {r['val_images']} | "
                     f"{'-' if took is None else f'{took:.0f}'} |")
    table = "\n".join(lines)
    print(table)
    gt, names, pole = (results[k]["val_miou"] for k in rows)
    print(f"POLE / ground truth = {pole / gt:.3f} (target >= 0.9); POLE - official names = {pole - names:+.2f}")
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"results": results, "pole_run_seconds": seconds, "gt_seconds": gt_seconds}, f, indent=2)


def gt_command_num_images(out: str) -> str:
    with open(os.path.join(out, "pole", "3_cams", "summary.json"), encoding="utf-8") as f:
        return str(json.load(f)["images"])


if __name__ == "__main__":
    main()
