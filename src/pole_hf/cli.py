"""`pole-hf` command line: demo, cam, select, train, eval, push, pull, run (labels to a segmentation model).

Exit codes: 0 success, 1 a runtime error (printed as one line), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .data.spec import SPEC_HELP


class CliError(Exception):
    """An error to print as one line and exit with code 1."""


def _model(path: str | None, base: str | None = None, preset: str | None = None):
    from .loading import load_prompt_model

    return load_prompt_model(path, base=base, preset=preset)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def expand_images(sources: list[str]) -> list[str]:
    """Image paths from files, URLs and folders (a folder gives its image files, sorted, not recursing)."""
    images = []
    for source in sources:
        if os.path.isdir(source):
            found = sorted(os.path.join(source, n) for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise CliError(f"folder {source!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            images.extend(found)
        else:
            images.append(source)
    return images


def read_labels_file(path: str) -> dict[str, list[str]]:
    """Per-image labels: a JSON object {file name: [labels]} or a metadata.jsonl with `file_name` and `labels`."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
                table = {row["file_name"]: row["labels"] for row in rows}
            else:
                table = json.load(f)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CliError(f"--labels_file {path}: not a JSON {{file: [labels]}} or a metadata.jsonl with file_name and "
                       f"labels ({type(err).__name__}: {err})") from None
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise CliError(f"--labels_file {path}: expected {{file name: [labels]}}")
    return {os.path.basename(k): v for k, v in table.items()}


def cmd_cam(args) -> None:
    import numpy as np
    from tqdm.auto import tqdm
    from transformers import pipeline

    from .atomic import atomic_save_npy, atomic_save_png
    from .bundled import TINY_PROMPTS
    from .naming import confined_path, output_stems

    images = expand_images(args.images)
    per_image = read_labels_file(args.labels_file) if args.labels_file else None
    if per_image is not None and args.labels is not None:
        raise CliError("give either --labels (the same for every image) or --labels_file, not both")
    model = _model(args.model, args.base, args.preset) if args.preset or args.base else args.model or TINY_PROMPTS
    pipe = pipeline("pole-cam", model=model, device=args.device)
    os.makedirs(args.out, exist_ok=True)
    stems = output_stems(os.path.splitext(os.path.basename(image))[0] for image in images)
    for image, stem in zip(tqdm(images, desc="CAMs", disable=args.quiet), stems):
        labels = args.labels
        if per_image is not None:
            labels = per_image.get(os.path.basename(image))
            if labels is None:
                raise CliError(f"--labels_file {args.labels_file} has no labels for {os.path.basename(image)!r}")
        out = pipe(image, labels=labels, refine=args.refine, crf=args.crf, return_overlay=True)
        atomic_save_npy(confined_path(args.out, f"{stem}_cams.npy"), out["cams"].astype(np.float16))
        for key in ("mask", "overlay"):
            atomic_save_png(confined_path(args.out, f"{stem}_{key}.png"), out[key])
        scores = ", ".join(f"{n} {s:.3f}" for n, s in zip(out["labels"], out["scores"]))
        print(f"{image} -> {stem}_*: {scores}")


def cmd_eval(args) -> None:
    from .data.spec import load_dataset_spec
    from .evaluation import evaluate_cams

    model = _model(args.model, args.base, args.preset)
    dataset = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                class_names=model.config.class_names,
                                image_size=model.clip.config.vision_config.image_size)  # synthetic: CLIP's size
    result = evaluate_cams(model, dataset, refine=args.refine, progress=not args.quiet)
    print(result["table"])
    print(f"CAM mIoU {100 * result['miou']:.2f} (best background power {result['bg_power']})")
    if args.out:
        from .atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))


def cmd_select(args) -> None:
    from .data.spec import load_dataset_spec
    from .selection import select_class_words

    model = _model(args.model, args.base, args.preset)
    dataset = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                class_names=model.config.class_names,
                                image_size=model.clip.config.vision_config.image_size)  # synthetic: CLIP's size
    candidates = None
    if args.candidates:
        with open(args.candidates, encoding="utf-8") as f:
            candidates = json.load(f)
    result = select_class_words(model, dataset, candidates=candidates, progress=not args.quiet)
    os.makedirs(args.out, exist_ok=True)
    result.save(os.path.join(args.out, "selection.json"))
    result.apply(model)
    model.save_pretrained(args.out)
    print(json.dumps(result.winners, indent=2))


def cmd_train(args, extra: list[str]) -> None:
    if getattr(args, "route", "clip-es") == "camnet":  # the paper's route; its loop ships in the package
        target = ["-m", "pole_hf.cam_network_training"]
    else:
        target = [find_example("train_pole.py")]
    command = ["accelerate", "launch", *args.launch_args.split(), *target, *extra] if args.launch_args else \
        [sys.executable, *target, *extra]
    code = subprocess.call(command)
    if code:
        raise CliError(f"training exited with code {code}")


def find_example(name: str) -> str:
    """Path of a script in `$POLE_HF_EXAMPLES`, the repository's `examples/` (a source checkout) or the copy a wheel
    installs into `{sys.prefix}/share/pole_hf/examples`."""
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(sys.prefix, "share", "pole_hf", "examples")
    for folder in (os.environ.get("POLE_HF_EXAMPLES"), os.path.join(here, "..", "..", "examples"), installed):
        if folder and os.path.isfile(os.path.join(folder, name)):
            return os.path.abspath(os.path.join(folder, name))
    raise CliError(f"examples/{name} not found: run from a source checkout or set POLE_HF_EXAMPLES to its folder")


def cmd_push(args) -> None:
    model = _model(args.folder)
    selection = os.path.join(args.folder, "selection.json")
    from .hub import saved_card

    card = saved_card(args.folder, args.repo_id)
    url = model.push_to_hub(args.repo_id, private=args.private or None, revision=args.revision,
                            selection_file=selection if os.path.isfile(selection) else None,
                            **({"card": card} if card is not None else {}))
    print(url)


def cmd_pull(args) -> None:
    from huggingface_hub import snapshot_download

    path = snapshot_download(args.repo_id, revision=args.revision, local_dir=args.local_dir)
    model = _model(path)  # also pulls the base CLIP into the cache
    print(f"{path} ({len(model.config.class_names)} classes on {model.config.base_model_name_or_path})")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(output_dir=args.out, num_images=args.num_images, base=args.base, progress=not args.quiet,
             full=args.full)


def cmd_run(args) -> None:
    from .run import StageError, run_pipeline

    try:
        run_pipeline(args)
    except StageError as err:
        raise CliError(str(err)) from None


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset` / `--base`: fresh prompts of a published setting instead of saved `--model` prompts."""
    from .vocab import PROMPT_PRESETS

    parser.add_argument("--preset", default=None, choices=sorted(PROMPT_PRESETS),
                        help="untouched prompts of a paper's setting (clip-es-voc: CLIP-ES; pole-voc: CLIMS/POLE) "
                             "instead of --model")
    parser.add_argument("--base", default=None, help="base CLIP for --preset (default: the bundled tiny CLIP)")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes, before or after its name (`pole-hf --quiet cam …`, `pole-hf cam --quiet`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error instead of one line")
    return common


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = _common_options()
    parser = argparse.ArgumentParser(prog="pole-hf", description="POLE prompts and CLIP-ES CAMs on Hugging Face",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"pole-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common])

    demo = command("demo", "offline demo on the bundled tiny CLIP and the synthetic world")
    demo.add_argument("--out", default="pole-demo", help="output folder (overlays, chart, table)")
    demo.add_argument("--num_images", type=positive_int, default=100, help="held-out synthetic images to score")
    demo.add_argument("--base", default=None, help="another base CLIP (its classes must fit the synthetic world)")
    demo.add_argument("--full", action="store_true", help="also the CAM network route (classification, CLIMS and "
                      "POLE networks through the CLIP: three more columns, ~5 minutes) and a segmentation model on "
                      "each prompt variant's pseudo masks (the last row; ~10 minutes per variant on 2 CPU cores)")

    cam = command("cam", "CAMs, pseudo masks and overlays for images")
    cam.add_argument("images", nargs="+", help="image files, folders of images, or http(s) URLs")
    cam.add_argument("--model", default=None, help="prompts folder or Hub repo (default: the bundled prompts)")
    add_preset_arguments(cam)
    cam.add_argument("--labels", nargs="*", default=None,
                     help="class names for every image (default: the classes CLIP predicts)")
    cam.add_argument("--labels_file", default=None,
                     help="per-image labels: JSON {file name: [labels]} or a metadata.jsonl (file_name, labels)")
    cam.add_argument("--refine", action="store_true", help="CLIP-ES's class-aware attention affinity (CAA)")
    cam.add_argument("--crf", action="store_true", help="dense-CRF pseudo masks (needs the crf extra)")
    cam.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    cam.add_argument("--out", required=True, help="output folder: NAME_cams.npy, NAME_mask.png, NAME_overlay.png")

    for name, text in (("select", "POLE class-word selection over a dataset"), ("eval", "CAM mIoU over a dataset")):
        p = command(name, text)
        p.add_argument("--model", default=None, help="prompts folder or Hub repo (default: the bundled prompts)")
        add_preset_arguments(p)
        p.add_argument("--dataset", default="synthetic", help=SPEC_HELP)
        p.add_argument("--split", default="train", help="dataset split")
        p.add_argument("--num_images", type=positive_int, default=None, help="first N images only")
        p.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
        if name == "select":
            p.add_argument("--candidates", default=None, help="JSON file {class: [words]}")
            p.add_argument("--out", required=True, help="output folder: selected prompts and selection.json")
        else:
            p.add_argument("--refine", action="store_true", help="CLIP-ES's class-aware attention affinity (CAA)")
            p.add_argument("--out", default=None, help="write the result as JSON")

    train = command("train", "run examples/train_pole.py or, with --route camnet, the CAM network training "
                             "(arguments after -- go to the script)")
    train.add_argument("--launch_args", default="",
                       help="accelerate launch options, e.g. '--multi_gpu --num_processes 2' (add --cpu after --)")
    train.add_argument("--route", default="clip-es", choices=["clip-es", "camnet"],
                       help="clip-es: learn prompts for GradCAM of CLIP (train_pole.py); camnet: train a CAM network "
                            "through frozen CLIP (CLIMS / POLE, train_cam_network.py)")

    from .run import add_run_arguments

    add_run_arguments(command("run", "labels to a segmentation model: select words, learn prompts, pseudo masks, "
                              "segmentation training, val mIoU (resumable)"))

    push = command("push", "push a prompts folder to the Hub")
    push.add_argument("folder", help="a saved prompts folder")
    push.add_argument("repo_id", help="Hub repo id, e.g. me/voc-prompts")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to push to")

    pull = command("pull", "download a prompts repo and its base CLIP into the cache")
    pull.add_argument("repo_id", help="Hub repo id")
    pull.add_argument("--revision", default=None, help="branch, tag or commit")
    pull.add_argument("--local_dir", default=None, help="also place the files in this folder")
    return parser


def error_line(err: BaseException) -> str:
    """One line for an exception: its message's first line, or its type and repr when the message is empty/odd."""
    text = str(err).strip()
    if isinstance(err, KeyError) or not text:
        return f"{type(err).__name__}: {text or 'no message'}"
    first = text.splitlines()[0]
    return first if isinstance(err, (CliError, ValueError, OSError, ImportError)) else f"{type(err).__name__}: {first}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    args.quiet, args.debug = getattr(args, "quiet", False), getattr(args, "debug", False)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the CLI prints its own progress; keep library chatter out of stderr
    if args.quiet:
        hf_logging.disable_progress_bar()
    handlers = {"cam": cmd_cam, "eval": cmd_eval, "select": cmd_select, "push": cmd_push, "pull": cmd_pull,
                "demo": cmd_demo, "run": cmd_run}
    if args.command in ("cam", "eval", "select", "demo", "run"):
        from .cpu_allocator import tune_cpu_allocator

        tune_cpu_allocator()  # CAMs on the CPU: large blocks reused, not faulted in anew (the process is ours)
    try:
        if args.command == "train":
            cmd_train(args, extra)
        else:
            handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"pole-hf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every error is one line (exit 1); --debug shows the traceback
        if args.debug:
            raise
        print(f"pole-hf {args.command}: error: {error_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
