"""The paper's table on the synthetic world: CAM networks trained through the bundled tiny CLIP, over seeds.

    python benchmarks/cam_network_synthetic.py --num_images 320 --eval_images 100 --clims_steps 120 --seeds 0 1 2 3 4

Per training seed: one classification-stage network (IRN's stage), then from it one second stage per variant:
CLIMS (official names), CoOp (learned context), DeFo (learned class tokens + context), POLE (per-pair selected
words), POLE + adapters, and both POLE rows again with the words chosen on the CLIMS network's CAMs (POLE's
`clip_selection.py` reads a baseline's CAMs from a workspace beside its CLIMS runs); beside them the CLIP-ES route (GradCAM of the frozen tiny CLIP, first seed). CAM mIoU:
background threshold / power sweep; pseudo-mask mIoU: dense CRF on the same CAMs. Rows give the mean and standard
deviation over the seeds and each variant's paired difference to CLIMS (same seed, same stage-1 network). Writes the
table into benchmarks/README.md under "## CAM network on the synthetic world", earlier runs kept below it.
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
EARLIER = "### Earlier runs"
ON_CLIMS = " (words on CLIMS's CAMs)"
"""Rows whose per-pair words are chosen on the CLIMS row's network's CAMs instead of the classification network's."""
VARIANTS = {"CLIMS": ["--variant", "clims"], "CoOp": ["--variant", "coop"], "DeFo": ["--variant", "defo"],
            "POLE": ["--variant", "pole"], "POLE + adapters": ["--variant", "pole", "--use_adapters"],
            "POLE" + ON_CLIMS: ["--variant", "pole"],
            "POLE + adapters" + ON_CLIMS: ["--variant", "pole", "--use_adapters"]}


def evaluate(model, dataset, crf: bool) -> tuple[float, float | None]:
    from pole_hf.evaluation import evaluate_cams

    result = evaluate_cams(model, dataset, thresholds=np.arange(0.05, 0.96, 0.05), crf=crf, progress=False)
    return 100 * result["miou"], (100 * result["pseudo_mask"]["miou"] if crf else None)


def evaluated(model_dir: str, dataset, crf: bool, key: str) -> tuple[float, float | None]:
    """`evaluate` of the network saved in `model_dir`, kept in its `eval.json` under `key` (the evaluation's
    settings) so that a rerun of the table only trains and evaluates what is missing."""
    from pole_hf import PoleCamNetwork

    path = os.path.join(model_dir, "eval.json")
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
    if key not in done:
        done[key] = evaluate(PoleCamNetwork.from_pretrained(model_dir), dataset, crf)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(done, f)
    return tuple(done[key])


def run_seed(args, seed: int, heldout, crf: bool) -> tuple[dict, str]:
    """All rows of one training seed: `({row: (cam mIoU, pseudo-mask mIoU)}, selection.json path)`."""
    from pole_hf.cam_network_training import main as train

    work = os.path.join(args.work_dir, f"seed{seed}")
    common = ["--dataset", "synthetic", "--num_images", str(args.num_images), "--seed", str(seed), "--cpu"]
    rows = {}
    stage1 = os.path.join(work, "classification")
    if not os.path.isfile(os.path.join(stage1, "model.safetensors")):
        train(["--stage", "classification", *common, "--num_train_epochs", str(args.classification_epochs),
               "--output_dir", stage1])
    key = f"{args.eval_split} {args.eval_images} crf={crf}"
    rows["classification CAMs"] = evaluated(stage1, heldout, crf, key)
    print(f"seed {seed} classification CAMs", rows["classification CAMs"], flush=True)
    order = sorted(args.variants, key=lambda n: n.endswith(ON_CLIMS))  # CLIMS's network first
    for name in order:
        on = "clims" if name.endswith(ON_CLIMS) else "classification"
        selection = os.path.join(work, f"select_{on}", "selection.json")
        if "pole" in VARIANTS[name] and not os.path.isfile(selection):
            train(["--stage", "select", *common, "--init_network", os.path.join(work, on),
                   "--output_dir", os.path.dirname(selection)])
        out = os.path.join(work, name.replace(" + ", "_").replace(" ", "_").replace("'", "").lower())
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            flags = [*VARIANTS[name], *(["--selection", selection] if "pole" in VARIANTS[name] else [])]
            train(["--stage", "clims", *common, *flags, "--init_network", stage1, "--max_train_steps",
                   str(args.clims_steps), "--output_dir", out, *args.extra.split()])
        rows[name] = evaluated(out, heldout, crf, key)
        print(f"seed {seed} {name}", rows[name], flush=True)
    return rows, os.path.join(work, "select_classification", "selection.json")


def clip_es_rows(args, selection: str, crf: bool) -> dict:
    """The CLIP-ES route on the same held-out split at the CLIP's 64 px: official names, the selection's vote."""
    from pole_hf import PolePromptModel
    from pole_hf.bundled import TINY_CLIP
    from pole_hf.data import SyntheticWorld, load_synthetic

    world = SyntheticWorld()
    heldout_clip = load_synthetic(num_images=args.eval_images, seed=7, image_size=64, split=args.eval_split)
    model = PolePromptModel.from_clip(TINY_CLIP, class_names=world.class_names,
                                      background_words=world.background_kinds)
    rows = {"CLIP-ES route (official names, GradCAM)": evaluate(model, heldout_clip, crf)}
    if os.path.isfile(selection):
        with open(selection, encoding="utf-8") as f:
            model.set_class_words(json.load(f)["winners"])
        rows["CLIP-ES route (selected words, GradCAM)"] = evaluate(model, heldout_clip, crf)
    return rows


def spread(values, sign: str = "") -> str:
    """`mean ± sd` (one value alone, '-' for none) of the values that are not None; `sign="+"` signs the mean."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = f"{np.mean(values):{sign}.1f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values, ddof=1):.1f}"


def table(per_seed: dict[int, dict], clip_es: dict, how: str) -> str:
    seeds = list(per_seed)
    names = list(dict.fromkeys(n for rows in per_seed.values() for n in rows))
    head = (f"| variant | CAM mIoU (mean ± sd) | per seed ({' / '.join(map(str, seeds))}) | - CLIMS, paired "
            f"(mean ± sd) | pseudo-mask mIoU ({how}) |")
    lines = [head, "|---|---:|---|---:|---:|"]
    for name in names:
        rows = [per_seed[s] for s in seeds if name in per_seed[s]]
        cams = [row[name][0] for row in rows]
        paired = name in VARIANTS and name != "CLIMS"
        diffs = [row[name][0] - row["CLIMS"][0] for row in rows if paired and "CLIMS" in row]
        lines.append(f"| {name} | {spread(cams)} | {' / '.join(f'{c:.1f}' for c in cams)} | "
                     f"{spread(diffs, '+')} | {spread([row[name][1] for row in rows])} |")
    for name, (cam, mask) in clip_es.items():
        lines.append(f"| {name} | {cam:.1f} | seed {seeds[0]}'s vote | - | {'-' if mask is None else f'{mask:.1f}'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=320, help="training images")
    parser.add_argument("--eval_images", type=int, default=100, help="held-out test images")
    parser.add_argument("--classification_epochs", type=int, default=8)
    parser.add_argument("--clims_steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work_dir", default="/tmp/camnet-bench")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--eval_split", default="test", help="'validation' to tune settings")
    parser.add_argument("--extra", default="", help="more flags for every second stage, e.g. '--learning_rate 0.02'")
    parser.add_argument("--no_clip_es", action="store_true", help="leave out the CLIP-ES route rows")
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants {unknown} are not among {list(VARIANTS)}")
    if any(v.endswith(ON_CLIMS) for v in args.variants) and "CLIMS" not in args.variants:
        parser.error(f"--variants '...{ON_CLIMS}' select on the CLIMS network's CAMs: list CLIMS too")
    torch.set_num_threads(1)
    from pole_hf.cam_network_training import SYNTHETIC_IMAGE_SIZE
    from pole_hf.data import load_synthetic
    from pole_hf.demo import crf_available

    start = time.time()
    crf = crf_available()
    heldout = load_synthetic(num_images=args.eval_images, seed=7, image_size=SYNTHETIC_IMAGE_SIZE,
                             split=args.eval_split)
    per_seed, selection = {}, None
    for seed in args.seeds:
        per_seed[seed], path = run_seed(args, seed, heldout, crf)
        selection = selection or path
    clip_es = {} if args.no_clip_es else clip_es_rows(args, selection, crf)
    seconds = time.time() - start
    body = (f"`python benchmarks/cam_network_synthetic.py --num_images {args.num_images} --eval_images "
            f"{args.eval_images} --clims_steps {args.clims_steps} --seeds {' '.join(map(str, args.seeds))}"
            + (f" --extra '{args.extra}'" if args.extra else "") + f"` on {platform.machine()}, torch "
            f"{torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s. Bundled tiny CLIP (64 px); "
            f"CAM network: small random ResNet (basic blocks, depths 1-1-1-1, widths 32-256) at "
            f"{SYNTHETIC_IMAGE_SIZE} px, output stride 16; per training seed {args.num_images} training images "
            f"(split `train`, the seed's own images), classification stage {args.classification_epochs} epochs, "
            f"each second stage {args.clims_steps} steps of batch 16 from that seed's network, both stages on the "
            f"reference augmentation scaled to the images (long side 80-160, flip, crop 128); evaluation on "
            f"{args.eval_images} held-out images (split `{args.eval_split}`, seed 7), CAM mIoU = best of the "
            f"background threshold sweep 0.05-0.95 and powers 1, 2 (CLIP-ES route rows: the same split rendered at "
            f"the CLIP's 64 px). POLE's words: per (image, class), chosen on the classification network's CAMs; "
            f"Rows ending{ON_CLIMS}: chosen on the CLIMS row's network's CAMs.\n\n"
            + table(per_seed, clip_es, "dense CRF" if crf else "no CRF installed"))
    print(body)
    if not args.no_write:
        old = ""
        if os.path.exists(README):
            with open(README, encoding="utf-8") as f:
                old = f.read()
        earlier = ""
        if HEADING in old:
            section = old.split(HEADING, 1)[1].split("\n## ", 1)[0]
            earlier = section.split(EARLIER, 1)[1] if EARLIER in section else section
            earlier = f"\n\n{EARLIER}\n{earlier.rstrip()}"
        replace_section(README, HEADING, body + earlier)
    return per_seed, clip_es


if __name__ == "__main__":
    main()
