"""`pole-hf run`: image-level labels to a segmentation model in one command, resumable stage by stage.

Stages, each in its own folder of the run directory and skipped once complete (its `stage.json` exists):

1. `1_select`  POLE word selection on the base CLIP (`pole_hf.selection.select_class_words`),
2. `2_prompts` class-token learning from the selected words (`examples/train_pole.py`, CLIP-ES route),
3. `3_cams`    CAMs and pseudo masks of the train split (`examples/generate_cams.py`, with the dense CRF when
               installed), saved as a `datasets.Dataset`,
4. `4_segmentation` a segmentation model trained on them and scored on val (`pole_hf.segmentation.train`).

A killed run continues at the stage where it stopped, and inside stages 2 and 4 at their last checkpoint (stage 3
skips the images it already wrote). The end prints a summary table and writes `results.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .atomic import atomic_write_text
from .bundled import TINY_CLIP
from .data import SyntheticWorld
from .data.spec import SPEC_HELP, class_names_of, load_dataset_spec
from .modeling_pole import PolePromptModel
from .selection import select_class_words

STAGES = ("1_select", "2_prompts", "3_cams", "4_segmentation")
STAGE_FILE = "stage.json"


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its log."""


def add_run_arguments(parser) -> None:
    """The `pole-hf run` flags (defaults: the offline synthetic world, about 10 minutes on 2 CPU cores)."""

    parser.add_argument("--dataset", default="synthetic", help=SPEC_HELP)
    parser.add_argument("--base", default=None, help="base CLIP id or folder (default: the bundled tiny CLIP)")
    parser.add_argument("--prompts", default=None, help="use these prompts (folder or Hub repo) for the pseudo masks: "
                        "stages 1-2 are skipped")
    parser.add_argument("--run_dir", default="pole-run")
    parser.add_argument("--num_images", type=int, default=None, help="first N training images, all stages "
                        "(default: 400 of the synthetic world, every image of other datasets)")
    parser.add_argument("--image_size", type=int, default=None, help="synthetic images' side (default: the "
                        "base CLIP's input size)")
    parser.add_argument("--select_images", type=int, default=100)
    parser.add_argument("--prompt_steps", type=int, default=100, help="class-token learning steps")
    parser.add_argument("--eval_images", type=int, default=100, help="val images (CAM and segmentation mIoU)")
    parser.add_argument("--no_crf", action="store_true", help="pseudo masks without the dense CRF")
    parser.add_argument("--seg_model", default=None, help="segmentation checkpoint (e.g. nvidia/mit-b0); default: "
                        "a SegFormer from --seg_config")
    parser.add_argument("--seg_config", default="mit-small", help="'mit-b0', 'mit-small', 'tiny' or a JSON file")
    parser.add_argument("--seg_crop_size", type=int, default=None, help="training crop and processor size "
                        "(default: --image_size; 512 suits VOC)")
    parser.add_argument("--seg_steps", type=int, default=800)
    parser.add_argument("--seg_batch_size", type=int, default=8)
    parser.add_argument("--seg_learning_rate", type=float, default=3e-3)
    parser.add_argument("--seg_scale_range", type=float, nargs=2, default=(0.75, 1.5))
    parser.add_argument("--checkpointing_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launch_args", default="", help="run stages 2-4 with `accelerate launch ARGS`, e.g. "
                        "'--multi_gpu --num_processes 8'")
    parser.add_argument("--cpu", action="store_true")


def stage_done(run_dir: str, stage: str) -> dict | None:
    """The record of a completed stage, or None."""
    path = os.path.join(run_dir, stage, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _launch(args, target: list[str]) -> list[str]:
    """The command that runs a script (or `-m module`) directly or under `accelerate launch`."""
    if args.launch_args:
        return [sys.executable, "-m", "accelerate.commands.launch", *args.launch_args.split(), *target]
    return [sys.executable, *target]


def _run_command(command: list[str], folder: str, stage: str) -> None:
    log = os.path.join(folder, "log.txt")
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise StageError(f"stage {stage} failed (exit code {code}); see {log}, fix it and rerun: finished stages "
                         "are kept")


def _select(args, folder: str, image_size: int) -> None:

    dataset = load_dataset_spec(args.dataset, split="train", num_images=args.select_images, seed=args.seed,
                                image_size=image_size)
    options, candidates = {}, None
    if args.dataset.startswith("synthetic"):

        world = SyntheticWorld()
        options["background_words"], candidates = world.background_kinds, world.candidates
    model = PolePromptModel.from_clip(args.base or TINY_CLIP, class_names=class_names_of(dataset), **options)
    result = select_class_words(model, dataset, candidates=candidates, progress=False)
    result.apply(model)
    model.save_pretrained(folder)
    result.save(os.path.join(folder, "selection.json"))


def stage_commands(args, run_dir: str, image_size: int) -> dict[str, list[str] | None]:
    """The command of each stage (None: runs in this process)."""
    from .cli import find_example

    folder = {stage: os.path.join(run_dir, stage) for stage in STAGES}
    cpu = ["--cpu"] if args.cpu else []
    num_images = args.num_images or (400 if args.dataset.startswith("synthetic") else None)
    common = ["--dataset", args.dataset, "--seed", str(args.seed), *cpu,
              *(["--num_images", str(num_images)] if num_images else [])]
    seg_size = ["--image_size", str(image_size)] + (["--crop_size", str(args.seg_crop_size)] if args.seg_crop_size
                                                    else [])
    crf = [] if args.no_crf or not _crf_available() else ["--crf"]
    return {
        "1_select": None,
        "2_prompts": _launch(args, [find_example("train_pole.py"), *common, "--prompts", folder["1_select"],
                                    "--output_dir", folder["2_prompts"], "--max_train_steps", str(args.prompt_steps),
                                    "--checkpointing_steps", str(args.checkpointing_steps),
                                    "--resume_from_checkpoint", "latest", "--eval_split", "val",
                                    "--eval_images", str(args.eval_images)]),
        "3_cams": _launch(args, [find_example("generate_cams.py"), *common,
                                 "--model", args.prompts or folder["2_prompts"],
                                 "--split", "train", "--image_size", str(image_size),
                                 "--output_dir", folder["3_cams"], *crf]),
        "4_segmentation": _launch(args, ["-m", "pole_hf.segmentation.train", "--dataset", args.dataset,
                                         "--masks", folder["3_cams"], *seg_size,
                                         "--world_seed", str(args.seed), "--seed", str(args.seed),
                                         "--eval_images", str(args.eval_images),
                                         "--output_dir", folder["4_segmentation"],
                                         *(["--model_name_or_path", args.seg_model] if args.seg_model else
                                           ["--config_name", args.seg_config]),
                                         "--max_train_steps", str(args.seg_steps),
                                         "--train_batch_size", str(args.seg_batch_size),
                                         "--learning_rate", str(args.seg_learning_rate),
                                         "--scale_range", *map(str, args.seg_scale_range),
                                         "--checkpointing_steps", str(args.checkpointing_steps),
                                         "--resume_from_checkpoint", "latest", *cpu]),
    }


def _crf_available() -> bool:
    from .demo import crf_available

    return crf_available()


def _base_image_size(args) -> int:
    if args.image_size:
        return args.image_size
    from transformers import AutoConfig


    config = AutoConfig.from_pretrained(args.base or TINY_CLIP)
    return getattr(config, "vision_config", config).image_size


def collect_results(run_dir: str) -> dict:
    """CAM, pseudo-mask and val mIoU (in %) of a finished run, with each stage's seconds."""
    results: dict = {"stages": {s: (stage_done(run_dir, s) or {}).get("seconds") for s in STAGES}}
    card = os.path.join(run_dir, "2_prompts", "README.md")
    if os.path.isfile(card):
        from huggingface_hub import ModelCard

        for entry in ModelCard.load(card).data.eval_results or []:
            if entry.metric_name == "CAM mIoU":
                results["cam_miou"] = entry.metric_value
    summary = os.path.join(run_dir, "3_cams", "summary.json")
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            value = json.load(f).get("miou")
        results["pseudo_mask_miou"] = None if value is None else round(100 * value, 2)
    seg = os.path.join(run_dir, "4_segmentation", "results.json")
    if os.path.isfile(seg):
        with open(seg, encoding="utf-8") as f:
            data = json.load(f)
        results["val_miou"] = round(100 * data["val_miou"], 2)
        results["val_images"], results["train_images"] = data["val_images"], data["train_images"]
    results["model"] = os.path.join(run_dir, "4_segmentation")
    return results


def summary_table(results: dict) -> str:
    def fmt(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [("CAM mIoU (val, learned prompts)", results.get("cam_miou")),
            ("pseudo-mask mIoU (train)", results.get("pseudo_mask_miou")),
            ("segmentation val mIoU", results.get("val_miou"))]
    lines = ["| result | % |", "|---|---:|", *(f"| {name} | {fmt(value)} |" for name, value in rows)]
    lines.append("| stage seconds | " + ", ".join(f"{s} {fmt(t)}" for s, t in results["stages"].items()) + " |")
    return "\n".join(lines)


def run_pipeline(args, log=print) -> dict:
    """Run (or resume) every stage into `args.run_dir`; returns the results written to `results.json`."""
    run_dir = os.path.abspath(args.run_dir)
    image_size = _base_image_size(args)
    commands = stage_commands(args, run_dir, image_size)
    for stage in STAGES:
        folder = os.path.join(run_dir, stage)
        if args.prompts and stage in ("1_select", "2_prompts"):
            log(f"pole-hf run: {stage} skipped: pseudo masks from --prompts {args.prompts}")
            continue
        if stage_done(run_dir, stage):
            log(f"pole-hf run: {stage} already complete, skipped")
            continue
        resumed = os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        log(f"pole-hf run: {stage} {'resumed' if resumed else 'started'} (log: {os.path.join(folder, 'log.txt')})")
        start = time.time()
        if commands[stage] is None:
            _select(args, folder, image_size)
        else:
            _run_command(commands[stage], folder, stage)
        record = {"stage": stage, "seconds": round(time.time() - start, 1), "command": commands[stage]}
        atomic_write_text(os.path.join(folder, STAGE_FILE), json.dumps(record, indent=2))
    results = collect_results(run_dir)
    atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2))
    log(summary_table(results))
    log(f"pole-hf run: the segmentation model is in {results['model']}: "
        f"pipeline('image-segmentation', model={results['model']!r})")
    return results
