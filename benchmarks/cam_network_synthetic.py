"""The paper's table on the synthetic world: CAM networks trained through the bundled tiny CLIP.

    python benchmarks/cam_network_synthetic.py --num_images 320 --eval_images 100 --clims_steps 120

One classification-stage network (IRN's stage), then from it one second stage per variant: CLIMS (official names),
CoOp (learned context), DeFo (learned class tokens + context), POLE (per-pair selected words), POLE + adapters;
beside them the CLIP-ES route (GradCAM of the frozen tiny CLIP). CAM mIoU: background threshold / power sweep;
pseudo-mask mIoU: dense CRF on the same CAMs. Writes the table into benchmarks/README.md under
"## CAM network on the synthetic world".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_synthetic import README, replace_section  # noqa: E402

HEADING = "## CAM network on the synthetic world"
VARIANTS = {"CLIMS": ["--variant", "clims"], "CoOp": ["--variant", "coop"], "DeFo": ["--variant", "defo"],
            "POLE": ["--variant", "pole"], "POLE + adapters": ["--variant", "pole", "--use_adapters"]}


def evaluate(model, dataset, crf: bool) -> tuple[float, float | None]:
    from pole_hf.evaluation import evaluate_cams

    result = evaluate_cams(model, dataset, thresholds=np.arange(0.05, 0.96, 0.05), crf=crf, progress=False)
    return 100 * result["miou"], (100 * result["pseudo_mask"]["miou"] if crf else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=320, help="training images")
    parser.add_argument("--eval_images", type=int, default=100, help="held-out test images")
    parser.add_argument("--classification_epochs", type=int, default=8)
    parser.add_argument("--clims_steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/camnet-bench")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--eval_split", default="test", help="'validation' to tune settings")
    parser.add_argument("--extra", default="", help="more flags for every second stage, e.g. '--learning_rate 0.02'")
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from pole_hf import PoleCamNetwork, PolePromptModel
    from pole_hf.bundled import TINY_CLIP
    from pole_hf.cam_network_training import SYNTHETIC_IMAGE_SIZE
    from pole_hf.cam_network_training import main as train
    from pole_hf.data import SyntheticWorld, load_synthetic
    from pole_hf.demo import crf_available

    start = time.time()
    crf = crf_available()
    work = args.work_dir
    common = ["--dataset", "synthetic", "--num_images", str(args.num_images), "--seed", str(args.seed), "--cpu"]
    heldout = load_synthetic(num_images=args.eval_images, seed=7, image_size=SYNTHETIC_IMAGE_SIZE,
                             split=args.eval_split)
    rows = {}
    stage1 = os.path.join(work, "classification")
    if not os.path.isfile(os.path.join(stage1, "model.safetensors")):
        train(["--stage", "classification", *common, "--num_train_epochs", str(args.classification_epochs),
               "--output_dir", stage1])
    rows["classification CAMs"] = evaluate(PoleCamNetwork.from_pretrained(stage1), heldout, crf)
    print("classification CAMs", rows["classification CAMs"], flush=True)
    selection = os.path.join(work, "select", "selection.json")
    if not os.path.isfile(selection):
        train(["--stage", "select", *common, "--init_network", stage1, "--output_dir", os.path.dirname(selection)])
    for name in args.variants:
        out = os.path.join(work, name.replace(" + ", "_").lower())
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            flags = [*VARIANTS[name], *(["--selection", selection] if "pole" in VARIANTS[name] else [])]
            train(["--stage", "clims", *common, *flags, "--init_network", stage1, "--max_train_steps",
                   str(args.clims_steps), "--output_dir", out, *args.extra.split()])
        rows[name] = evaluate(PoleCamNetwork.from_pretrained(out), heldout, crf)
        print(name, rows[name], flush=True)
    world = SyntheticWorld()
    clip_size = 64
    heldout_clip = load_synthetic(num_images=args.eval_images, seed=7, image_size=clip_size, split=args.eval_split)
    official = PolePromptModel.from_clip(TINY_CLIP, class_names=world.class_names,
                                         background_words=world.background_kinds)
    rows["CLIP-ES route (official names, GradCAM)"] = evaluate(official, heldout_clip, crf)
    with open(selection, encoding="utf-8") as f:
        winners = json.load(f)["winners"]
    selected = PolePromptModel.from_clip(TINY_CLIP, class_names=world.class_names,
                                         background_words=world.background_kinds)
    selected.set_class_words(winners)
    rows["CLIP-ES route (selected words, GradCAM)"] = evaluate(selected, heldout_clip, crf)
    seconds = time.time() - start
    how = "dense CRF" if crf else "no CRF installed"
    lines = ["| variant | CAM mIoU | pseudo-mask mIoU (" + how + ") |", "|---|---:|---:|"]
    for name, (cam, mask) in rows.items():
        lines.append(f"| {name} | {cam:.1f} | {'-' if mask is None else f'{mask:.1f}'} |")
    clims = rows.get("CLIMS", (float("nan"),))[0]
    gains = ", ".join(f"{n} {rows[n][0] - clims:+.1f}" for n in rows if n in VARIANTS and n != "CLIMS")
    body = (f"`python benchmarks/cam_network_synthetic.py --num_images {args.num_images} --eval_images "
            f"{args.eval_images} --clims_steps {args.clims_steps} --seed {args.seed}"
            + (f" --extra '{args.extra}'" if args.extra else "") + f"` on {platform.machine()}, torch "
            f"{torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s. Bundled tiny CLIP (64 px); "
            f"CAM network: small random ResNet (basic blocks, depths 1-1-1-1, widths 32-256) at "
            f"{SYNTHETIC_IMAGE_SIZE} px, output stride 16; training seed {args.seed}, {args.num_images} training "
            f"images (split `train`), classification stage {args.classification_epochs} epochs, each second stage "
            f"{args.clims_steps} steps of batch 16 from that same network, both stages on the reference augmentation "
            f"scaled to the images (long side 80-160, flip, crop 128; `pole_hf.augmentation`); evaluation on {args.eval_images} "
            f"held-out images (split `{args.eval_split}`, seed 7), CAM mIoU = best of the background threshold "
            f"sweep 0.05-0.95 and powers 1, 2 (CLIP-ES route rows: the same split rendered at the CLIP's 64 px). "
            f"POLE's words: per (image, class), chosen on the classification network's CAMs.\n\n"
            + "\n".join(lines) + f"\n\nCAM mIoU over CLIMS: {gains}.")
    print(body)
    if not args.no_write:
        replace_section(README, HEADING, body)
    return rows


if __name__ == "__main__":
    main()
