"""`pole-hf` command line: demo, cam, select, train, eval, push, pull, run (labels to a segmentation model).

Exit codes: 0 success, 1 a runtime error (printed as one line), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


class CliError(Exception):
    """An error to print as one line and exit with code 1."""


def _model(path: str | None):
    from . import PolePromptModel
    from .bundled import TINY_PROMPTS

    return PolePromptModel.from_pretrained(path or TINY_PROMPTS)


def cmd_cam(args) -> None:
    import numpy as np
    from tqdm.auto import tqdm
    from transformers import pipeline

    from .atomic import atomic_save_npy, atomic_save_png
    from .bundled import TINY_PROMPTS

    pipe = pipeline("pole-cam", model=args.model or TINY_PROMPTS)
    os.makedirs(args.out, exist_ok=True)
    for image in tqdm(args.images, desc="CAMs", disable=args.quiet):
        out = pipe(image, labels=args.labels, refine=args.refine, return_overlay=True)
        stem = os.path.splitext(os.path.basename(image))[0]
        atomic_save_npy(os.path.join(args.out, f"{stem}_cams.npy"), out["cams"].astype(np.float16))
        for key in ("mask", "overlay"):
            atomic_save_png(os.path.join(args.out, f"{stem}_{key}.png"), out[key])
        print(f"{image}: {', '.join(f'{n} {s:.3f}' for n, s in zip(out['labels'], out['scores']))}")


def cmd_eval(args) -> None:
    from .data.spec import load_dataset_spec
    from .evaluation import evaluate_cams

    model = _model(args.model)
    dataset = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                class_names=model.config.class_names)
    result = evaluate_cams(model, dataset, refine=args.refine, progress=not args.quiet)
    print(result["table"])
    print(f"CAM mIoU {100 * result['miou']:.2f} (best background power {result['bg_power']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "table"}, f, indent=2)


def cmd_select(args) -> None:
    from .data.spec import load_dataset_spec
    from .pipeline_pole import load_image_processor
    from .selection import select_class_words

    model = _model(args.model)
    dataset = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                class_names=model.config.class_names)
    candidates = None
    if args.candidates:
        with open(args.candidates, encoding="utf-8") as f:
            candidates = json.load(f)
    result = select_class_words(model, dataset, candidates=candidates, processor=load_image_processor(model),
                                progress=not args.quiet)
    os.makedirs(args.out, exist_ok=True)
    result.save(os.path.join(args.out, "selection.json"))
    result.apply(model)
    model.save_pretrained(args.out)
    print(json.dumps(result.winners, indent=2))


def cmd_train(args, extra: list[str]) -> None:
    script = find_example("train_pole.py")
    command = ["accelerate", "launch", *args.launch_args.split(), script, *extra] if args.launch_args else \
        [sys.executable, script, *extra]
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
    url = model.push_to_hub(args.repo_id, private=args.private or None, revision=args.revision,
                            selection_file=selection if os.path.isfile(selection) else None)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pole-hf", description="POLE prompts and CLIP-ES CAMs on Hugging Face")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline demo on the bundled tiny CLIP and the synthetic world")
    demo.add_argument("--out", default="pole-demo")
    demo.add_argument("--num_images", type=int, default=100)
    demo.add_argument("--base", default=None, help="another base CLIP (its classes must fit the synthetic world)")
    demo.add_argument("--full", action="store_true", help="also train a segmentation model on each variant's "
                      "pseudo masks (the last column; ~10 minutes per variant on 2 CPU cores)")

    cam = sub.add_parser("cam", help="CAMs, pseudo masks and overlays for images")
    cam.add_argument("images", nargs="+")
    cam.add_argument("--model", default=None, help="prompts folder or Hub repo (default: bundled)")
    cam.add_argument("--labels", nargs="*", default=None)
    cam.add_argument("--refine", action="store_true")
    cam.add_argument("--out", required=True)

    for name, text in (("select", "POLE class-word selection over a dataset"), ("eval", "CAM mIoU over a dataset")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", default=None)
        p.add_argument("--dataset", default="synthetic")
        p.add_argument("--split", default="train")
        p.add_argument("--num_images", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
        if name == "select":
            p.add_argument("--candidates", default=None, help="JSON file {class: [words]}")
            p.add_argument("--out", required=True)
        else:
            p.add_argument("--refine", action="store_true")
            p.add_argument("--out", default=None, help="write the result as JSON")

    train = sub.add_parser("train", help="run examples/train_pole.py (arguments after -- go to the script)")
    train.add_argument("--launch_args", default="", help="e.g. '--cpu --num_processes 2' for accelerate launch")

    from .run import add_run_arguments

    add_run_arguments(sub.add_parser("run", help="labels to a segmentation model: select words, learn prompts, "
                                     "pseudo masks, segmentation training, val mIoU (resumable)"))

    push = sub.add_parser("push", help="push a prompts folder to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None)

    pull = sub.add_parser("pull", help="download a prompts repo and its base CLIP into the cache")
    pull.add_argument("repo_id")
    pull.add_argument("--revision", default=None)
    pull.add_argument("--local_dir", default=None)
    return parser


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
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the CLI prints its own progress; keep library chatter out of stderr
    if args.quiet:
        hf_logging.disable_progress_bar()
    handlers = {"cam": cmd_cam, "eval": cmd_eval, "select": cmd_select, "push": cmd_push, "pull": cmd_pull,
                "demo": cmd_demo, "run": cmd_run}
    try:
        if args.command == "train":
            cmd_train(args, extra)
        else:
            handlers[args.command](args)
    except (CliError, ValueError, OSError, ImportError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"pole-hf {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
