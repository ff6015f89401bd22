"""CAMs and pseudo masks for a whole dataset, sharded across accelerate processes, resumable.

    accelerate launch examples/generate_cams.py --model out/prompts --dataset voc:/data/VOCdevkit/VOC2012 \
        --split train --output_dir cams/ --refine

Writes, per image id: ``cams/{id}.npy`` (float16 ``[k, H, W]``, one map per image label in the dataset's class order)
and ``masks/{id}.png`` (VOC palette; 0 background, 255 ignore), each atomically (temporary name, then rename). File
names are the ids made safe (`pole_hf.naming`: path parts joined by ``__``, never outside the folder) and distinct
(a repeated id gets ``-2``, ``-3``...). ``settings.json`` records what the outputs depend on (a hash of the prompts,
the data, the CAM options): a rerun with the same settings skips images whose two files exist; with other settings
it is refused unless ``--overwrite`` (which recomputes). Unreadable images are logged and skipped; ``summary.json``
counts them and, when the dataset has masks, gives CAM-mask mIoU over every finished image.
At the end ``dataset/`` holds the masks with their images and labels as a ``datasets.Dataset``
(``pole_hf.segmentation.load_pseudo_masks(output_dir)``; the segmentation stage reads it with ``--masks``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from pole_hf import PoleImageProcessor
from pole_hf.atomic import atomic_save_npy, atomic_save_png, atomic_write_text, remove_partial_files
from pole_hf.cam_inference import iter_cams
from pole_hf.cpu_allocator import tune_cpu_allocator
from pole_hf.data.spec import (
    SPEC_HELP,
    class_names_of,
    example_ids,
    iter_examples,
    load_dataset_spec,
)
from pole_hf.evaluation import ConfusionMatrix
from pole_hf.loading import load_prompt_model
from pole_hf.masks import (
    BackgroundRule,
    cams_to_mask,
    class_scores,
    crf_refine,
    image_to_mask,
    mask_to_image,
    scores_to_mask,
)
from pole_hf.naming import confined_path, output_stems
from pole_hf.training import log_run_start
from pole_hf.vocab import PROMPT_PRESETS

logger = logging.getLogger("generate_cams")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="prompts folder or Hub repo (default: the bundled prompts)")
    parser.add_argument("--preset", default=None, choices=sorted(PROMPT_PRESETS),
                        help="untouched prompts of a paper's setting instead of --model (clip-es-voc: CLIP-ES's "
                             "'a clean origami {}.', words and 25 background words; pole-voc: CLIMS/POLE's)")
    parser.add_argument("--base", default=None, help="base CLIP of --preset (default: the bundled tiny CLIP)")
    parser.add_argument("--dataset", default="synthetic", help=SPEC_HELP)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=None, help="first N images only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_argument("--image_size", type=int, default=96, help="side of the synthetic world's images")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--refine", action="store_true", help="class-aware attention affinity (CAA)")
    parser.add_argument("--box_edges", choices=("clip_es", "full"), default="clip_es",
                        help="CAA boxes as CLIP-ES (the grid's last row/column never inside) or whole boxes")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="images of one computation size per CAM call (VOC's images come in a few sizes)")
    parser.add_argument("--bg_power", type=float, default=1.0, help="background = (1 - max cam) ** bg_power")
    parser.add_argument("--crf", action="store_true", help="dense CRF on the class scores before the argmax "
                        "(CLIP-ES' pseudo masks; needs pydensecrf2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute everything when the folder holds results of other settings")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--push_to_hub", default=None, help="push the CAM/mask dataset to this Hub dataset repo")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"--batch_size {args.batch_size} must be at least 1")
    accelerator = Accelerator(cpu=args.cpu)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if accelerator.device.type == "cpu" and tune_cpu_allocator():
        logger.info("glibc malloc keeps freed blocks for reuse (pole_hf.cpu_allocator)")
    log_run_start(logger, accelerator, "generate_cams.py")
    model = load_prompt_model(args.model, base=args.base, preset=args.preset).to(accelerator.device)
    processor = PoleImageProcessor.for_model(model)
    rule = BackgroundRule("power", args.bg_power)
    dataset = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                image_size=args.image_size, class_names=model.config.class_names)
    names = class_names_of(dataset)
    if names != model.config.class_names:
        raise SystemExit(f"the dataset's classes {names} differ from the model's {model.config.class_names}")
    cam_dir, mask_dir = os.path.join(args.output_dir, "cams"), os.path.join(args.output_dir, "masks")
    settings = run_settings(args, model)
    clear = check_settings(args.output_dir, settings, overwrite=args.overwrite, folders=(cam_dir, mask_dir))
    accelerator.wait_for_everyone()  # every process has read the folder before the main one clears it
    if clear and accelerator.is_main_process:
        for folder in (cam_dir, mask_dir):
            shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(cam_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    if accelerator.is_main_process:
        for folder in (args.output_dir, cam_dir, mask_dir):
            remove_partial_files(folder)
        atomic_write_text(os.path.join(args.output_dir, SETTINGS_FILE), json.dumps(settings, indent=2))
    accelerator.wait_for_everyone()
    stems = output_stems(example_ids(dataset))
    shard = range(accelerator.process_index, len(dataset), accelerator.num_processes)
    matrix = ConfusionMatrix(len(names) + 1)
    done = computed = 0
    skipped: list[str] = []

    def to_compute():  # resumed and unreadable examples are settled here; the rest get CAMs, size-bucketed
        nonlocal done
        for example in tqdm(iter_examples(dataset, shard), total=len(shard), disable=not accelerator.is_main_process,
                            desc="CAMs"):
            stem = stems[example.index]
            cam_path, mask_path = confined_path(cam_dir, f"{stem}.npy"), confined_path(mask_dir, f"{stem}.png")
            if os.path.exists(cam_path) and os.path.exists(mask_path):
                with Image.open(mask_path) as saved:
                    pred = image_to_mask(saved)
                done += 1
                if example.mask is not None:
                    matrix.update(pred, example.mask)
            elif example.image is None:
                logger.warning("skipping %s: %s", example.id, example.error)
                skipped.append(example.id)
            else:
                yield example

    for example, output in iter_cams(model, processor, to_compute(), image=lambda e: e.image,
                                     targets=lambda e: e.targets, batch_size=args.batch_size,
                                     scales=tuple(args.scales), flip=args.flip, refine=args.refine,
                                     box_edges=args.box_edges):
        if output is None:
            cams, ids = np.zeros((0, example.image.size[1], example.image.size[0]), np.float32), []
        else:
            cams, ids = output.cams.numpy(), [int(i) + 1 for i in output.class_indices]  # the maps' own classes
        if args.crf and ids:
            pred = scores_to_mask(crf_refine(np.asarray(example.image), class_scores(cams, rule)), ids)
        else:
            pred = cams_to_mask(cams, ids, rule)
        stem = stems[example.index]
        atomic_save_npy(confined_path(cam_dir, f"{stem}.npy"), cams.astype(np.float16))
        atomic_save_png(confined_path(mask_dir, f"{stem}.png"), mask_to_image(pred))
        computed += 1
        if example.mask is not None:
            matrix.update(pred, example.mask)
    totals = torch.tensor(matrix.matrix, dtype=torch.int64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum").cpu().numpy()
    counts = accelerator.reduce(torch.tensor([done, computed, len(skipped)], device=accelerator.device),
                                reduction="sum").tolist()
    skipped_all = accelerator.gather_for_metrics(skipped, use_gather_object=True)
    summary = {"images": len(dataset), "resumed": counts[0], "computed": counts[1], "skipped": counts[2],
               "skipped_ids": sorted(skipped_all), "model": args.model or (f"preset {args.preset}" if args.preset
                                                                      else "pole_hf bundled tiny prompts")}
    if totals.sum() > 0:
        merged = ConfusionMatrix(len(names) + 1)
        merged.matrix = totals
        summary["miou"] = float(merged.miou())
        summary["per_class_iou"] = dict(zip(["background", *names], map(float, merged.iou())))
    if accelerator.is_main_process:
        # stage 3's input: the masks with their images and labels as a datasets.Dataset, before summary.json
        from pole_hf.segmentation import save_pseudo_mask_dataset

        masks = save_pseudo_mask_dataset(dataset, mask_dir, stems, args.output_dir,
                                         description=f"pseudo masks of {args.dataset} by {summary['model']}")
        atomic_write_text(os.path.join(args.output_dir, "summary.json"), json.dumps(summary, indent=2))
        logger.info("summary: %s", {k: v for k, v in summary.items() if k != "per_class_iou"})
        if args.push_to_hub:
            masks.push_to_hub(args.push_to_hub)
    accelerator.wait_for_everyone()
    return summary


SETTINGS_FILE = "settings.json"


def run_settings(args, model) -> dict:
    """What the outputs depend on: the prompts (a hash of their tensors and config), the data and the CAM options."""
    import hashlib

    from pole_hf.loading import prompt_state_dict

    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(prompt_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"prompts_sha256": digest.hexdigest(), "dataset": args.dataset, "split": args.split, "seed": args.seed,
            "refine": args.refine, "scales": list(args.scales), "flip": args.flip, "bg_power": args.bg_power,
            "crf": args.crf, "image_size": args.image_size}


def check_settings(output_dir: str, settings: dict, overwrite: bool, folders) -> bool:
    """Whether earlier results must be cleared; refuses to resume into a folder computed with other settings.

    Every process calls it (it only reads), so a refusal ends all of them.
    """
    path = os.path.join(output_dir, SETTINGS_FILE)
    has_results = any(os.path.isdir(folder) and os.listdir(folder) for folder in folders)
    if not os.path.isfile(path):
        if has_results and not overwrite:
            raise SystemExit(f"generate_cams.py: error: {output_dir} holds CAMs without {SETTINGS_FILE} (another "
                             "version or run): pass --overwrite to recompute them, or use a new --output_dir")
        return has_results
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed and not overwrite:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed if k != "prompts_sha256")
        raise SystemExit(f"generate_cams.py: error: {output_dir} holds CAMs computed with other settings "
                         f"({details or 'other prompts'}): pass --overwrite to recompute them, or use a new "
                         "--output_dir")
    return bool(changed)


if __name__ == "__main__":
    main()
