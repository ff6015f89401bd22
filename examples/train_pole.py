"""POLE prompt class learning with accelerate: optional class-word selection, then class-token learning.

    accelerate launch examples/train_pole.py --dataset voc:/data/VOCdevkit/VOC2012 \
        --base openai/clip-vit-base-patch16 --output_dir out/
    accelerate launch --multi_gpu --num_processes 2 examples/train_pole.py --cpu --dataset synthetic --output_dir out/

Each step: CAMs of the current prompts (detached) for every (image, label) pair, CAM-masked foreground and
background images, POLE's OTM + BTM + CBS loss; gradients reach only the class tokens (and the optional context and
adapters). Every process draws the same global batches and keeps its slice by position (an uneven last batch is split
without padding), and each process's loss is scaled by its share of the global pairs, so gradients summed over
processes equal the one-process gradient of the same batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from pole_hf import PoleImageProcessor, PolePromptModel, training
from pole_hf.atomic import atomic_write_text
from pole_hf.bundled import TINY_CLIP
from pole_hf.data.spec import SPEC_HELP, class_names_of, load_dataset_spec
from pole_hf.objective import PoleObjective, pairs_from_cams
from pole_hf.selection import load_candidates, select_class_words
from pole_hf.vocab import PROMPT_PRESETS

logger = logging.getLogger("train_pole")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="POLE prompt class learning")
    parser.add_argument("--dataset", default="synthetic", help=SPEC_HELP)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=None, help="first N training images")
    parser.add_argument("--eval_split", default=None, help="evaluate CAM mIoU on this split")
    parser.add_argument("--eval_images", type=int, default=50)
    parser.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    parser.add_argument("--base", default=None, help="base CLIP id or folder (default: the bundled tiny CLIP)")
    parser.add_argument("--prompts", default=None, help="start from saved prompts instead of the class names")
    parser.add_argument("--class_words", default=None, help="JSON {class: word} for the initial prompt words")
    parser.add_argument("--background_words", nargs="*", default=None)
    parser.add_argument("--preset", default=None, choices=sorted(PROMPT_PRESETS),
                        help="start from a paper's prompt setting: clip-es-voc (CLIP-ES's 'a clean origami {}.', "
                             "words, 25 background words) or pole-voc (CLIMS/POLE's 'a photo of {}.', words, 10 "
                             "background prompts); --class_words / --background_words override its fields")
    parser.add_argument("--class_token_length", type=int, default=None,
                        help="fixed vectors per class (longer words are averaged: changes the prompt); default: "
                             "every token of the class word")
    parser.add_argument("--learnable_tokens", default="all", choices=["all", "first"],
                        help="'first': POLE's DeFo-style variant, only the word's first token is learned")
    parser.add_argument("--learn_context", action="store_true", help="also learn the context (same as --learn both)")
    parser.add_argument("--learn", default=None, choices=["class_tokens", "context", "both"],
                        help="what the prompts learn: the class tokens (POLE/DeFo, the default), the context alone "
                             "with the class tokens frozen (CoOp), or both")
    parser.add_argument("--use_adapters", action="store_true")
    parser.add_argument("--loss_weights", default="10,25,1", help="POLE's OTM,BTM,CBS weights")
    parser.add_argument("--loss_image_feature", default=None, choices=["pooled", "patch_mean"],
                        help="image feature of the POLE losses (default: the model's config.image_feature)")
    parser.add_argument("--select", action="store_true", help="POLE word selection before learning")
    parser.add_argument("--select_images", type=int, default=100)
    parser.add_argument("--candidates", default=None,
                        help="JSON file {class: [words]} for --select (default: POLE's VOC synonyms for VOC classes, "
                             "the world's caption words for the synthetic world)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_batch_size", type=int, default=8, help="global batch size")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--lr_scheduler_type", default="cosine")
    parser.add_argument("--num_warmup_steps", type=int, default=0)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None)
    training.add_run_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("max_train_steps", "num_train_epochs", "train_batch_size", "eval_images", "select_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value} must be at least 1")
    if args.num_images is not None and args.num_images < 1:
        parser.error(f"--num_images {args.num_images} must be at least 1")
    try:
        training.check_trackers(args.report_to)
    except ImportError as err:
        parser.error(str(err))
    return args


def local_batches(data: training.PixelDataset, batch_size: int, seed: int, epoch: int, accelerator) -> list:
    """This process's slices of one epoch's global batches (`pole_hf.training.epoch_batches`), decoded lazily when
    a `_LocalBatch` is unpacked; a slice may be empty (uneven last batch)."""
    parts = training.epoch_batches(len(data), batch_size, seed, epoch, accelerator.process_index,
                                   accelerator.num_processes)
    return [_LocalBatch(data, part) for part in parts]


class _LocalBatch:
    def __init__(self, data: training.PixelDataset, indices: list[int]):
        self.data, self.indices = data, indices

    def __iter__(self):
        items = [self.data[i] for i in self.indices]
        pixels = torch.stack([p for p, _, _ in items]) if items else torch.zeros(0, 3, *self.data.size)
        return iter((pixels, [labels for _, labels, _ in items]))


def build_model(args, class_names):
    if args.prompts:
        return PolePromptModel.from_pretrained(args.prompts)
    options = dict(class_token_length=args.class_token_length, learnable_tokens=args.learnable_tokens,
                   learn_context=learned_parts(args) != {"class_tokens"},
                   use_adapters=args.use_adapters, preset=args.preset)
    if args.class_words:
        options["class_words"] = json.loads(args.class_words)
    if args.background_words is not None:
        options["background_words"] = args.background_words
    elif args.dataset.startswith("synthetic") and args.preset is None:
        from pole_hf.data import SyntheticWorld

        options["background_words"] = SyntheticWorld().background_kinds
    return PolePromptModel.from_clip(args.base or TINY_CLIP, class_names=class_names, **options)


def learned_parts(args) -> set[str]:
    """The prompt parts `--learn` (or `--learn_context`) trains: `class_tokens` and/or `context`."""
    learn = args.learn or ("both" if args.learn_context else "class_tokens")
    return {"class_tokens", "context"} if learn == "both" else {learn}


def freeze_unlearned(model, parts: set[str]) -> None:
    """CoOp: the class tokens stay as initialised (the official names) when only the context learns."""
    model.prompt_learner.class_tokens.requires_grad_("class_tokens" in parts)
    if model.prompt_learner.context is not None:
        model.prompt_learner.context.requires_grad_("context" in parts)


def pair_count(labels) -> int:
    return sum(len(item) for item in labels)


def base_image_size(args) -> int:
    """The base CLIP's input size (synthetic images are generated at it)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.prompts or args.base or TINY_CLIP)
    clip = getattr(config, "clip_config", None) or config
    return clip.vision_config.image_size


def load_data(args):
    """The training split; the evaluation split (into `args.eval_set`) is loaded, and a wrong name refused, before
    any training."""
    args.image_size = base_image_size(args)
    train_set = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                  image_size=args.image_size)
    args.eval_set = load_dataset_spec(args.dataset, split=args.eval_split, num_images=args.eval_images, seed=0,
                                      image_size=args.image_size, class_names=class_names_of(train_set)) \
        if args.eval_split else None
    return train_set


def select_words(args, model, train_set, processor, accelerator):
    """POLE's class-word selection on the first `--select_images` images, applied to the model."""
    subset = train_set.select(range(min(args.select_images, len(train_set))))
    selection = select_class_words(model, subset, candidates=load_candidates(args.candidates, args.dataset),
                                   processor=processor, progress=accelerator.is_main_process)
    selection.apply(model)
    return selection


def resume(args, accelerator, owned) -> int:
    """Load the checkpoint `--resume_from_checkpoint` names (or the latest); the step it was saved at (0: none)."""
    if not args.resume_from_checkpoint:
        return 0
    path = training.latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest" \
        else args.resume_from_checkpoint
    if not path:
        return 0
    step = training.load_checkpoint(accelerator, path, owned)
    if accelerator.is_main_process:
        logger.info("resumed from %s at step %d", os.path.basename(path), step)
    return step


def batch_loss(model, objective, pixels, labels, params, accelerator):
    """This process's slice of a global batch: its CAMs (one forward, one batched backward), the POLE loss of its
    pairs weighted by their share of the global batch's pairs, and the loss terms for the logs."""
    total_pairs = accelerator.reduce(torch.tensor(pair_count(labels), device=accelerator.device), "sum")
    if not pair_count(labels):  # this process's slice of an uneven last batch is empty: it adds zero gradients
        return sum((param * 0).sum() for param in params), {"otm": 0.0, "btm": 0.0, "cbs": 0.0}
    cam_output = model.get_cams(pixels, labels)
    maps, images, classes = pairs_from_cams(cam_output.cams, cam_output.cam_classes)
    with accelerator.autocast():
        out = objective(model, pixels, maps, classes, image_indices=images,
                        pair_share=pair_count(labels) / max(int(total_pairs), 1))
    return out.loss, {"otm": out.otm.item(), "btm": out.btm.item(), "cbs": out.cbs.item()}


def optimizer_step(loss, params, optimizer, scheduler, accelerator, step: int, output_dir: str) -> None:
    """Backward, the prompt gradients summed over processes (the frozen CLIP is not in DDP), the update; a NaN/Inf
    loss or update stops the run with the step and what to do."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss.item()} at step {step}: lower --learning_rate; the last "
                                 f"checkpoint in {output_dir} is intact")
    optimizer.zero_grad()
    accelerator.backward(loss)
    for param in params:
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, "sum")
    optimizer.step()
    if not all(torch.isfinite(param).all() for param in params):
        raise FloatingPointError(f"the prompt tensors became NaN/Inf at step {step}: lower --learning_rate; the "
                                 f"last checkpoint in {output_dir} is intact")
    scheduler.step()


def training_function(args) -> dict:
    # split_batches: the batch size is global, so the prepared scheduler steps once per optimizer step (without it
    # accelerate steps it once per process)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_dir=args.output_dir,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    training.log_run_start(logger, accelerator, "train_pole.py")
    set_seed(args.seed)
    train_set = load_data(args)
    model = build_model(args, class_names_of(train_set)).to(accelerator.device)
    processor = PoleImageProcessor.for_model(model)
    selection = select_words(args, model, train_set, processor, accelerator) if args.select else None
    data = training.PixelDataset(train_set, (args.image_size, args.image_size), processor.image_mean,
                                 processor.image_std)
    freeze_unlearned(model, learned_parts(args))
    params = [p for p in model.learnable_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(data) / args.train_batch_size)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=max_steps)
    # the frozen CLIP is not wrapped in DDP: gradients of the few prompt tensors are summed by hand below; the
    # data is not prepared either: every process draws the same global batches and keeps its slice of each
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    owned = {name: module for name, module in (("prompt_learner", model.prompt_learner),
                                               ("visual_adapter", model.visual_adapter),
                                               ("text_adapter", model.text_adapter)) if module is not None}
    if args.report_to:
        accelerator.init_trackers("pole", config={k: v for k, v in vars(args).items() if v is not None})
    otm, btm, cbs = (float(w) for w in args.loss_weights.split(","))
    objective = PoleObjective(weights={"otm": otm, "btm": btm, "cbs": cbs}, image_feature=args.loss_image_feature)
    step = resume(args, accelerator, owned)
    start_epoch, skip = divmod(step, steps_per_epoch)
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process, desc="POLE")
    history = []
    try:
        for epoch in range(start_epoch, epochs):
            batches = local_batches(data, args.train_batch_size, args.seed, epoch, accelerator)
            for pixels, labels in batches[skip if epoch == start_epoch else 0:]:
                if step >= max_steps:
                    break
                loss, terms = batch_loss(model, objective, pixels.to(accelerator.device), labels, params, accelerator)
                optimizer_step(loss, params, optimizer, scheduler, accelerator, step + 1, args.output_dir)
                step += 1
                logs = {"loss": accelerator.reduce(loss.detach(), "sum").item(), **terms,
                        "lr": scheduler.get_last_lr()[0]}
                training.record_step(accelerator, progress, history, logs, step)
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    training.save_checkpoint(accelerator, args.output_dir, step, owned)
                if args.eval_every and step % args.eval_every == 0 and accelerator.is_main_process:
                    accelerator.log({"cam_miou": cam_miou(args, model, processor)}, step=step)
            skip = 0
    finally:
        progress.close()
    accelerator.wait_for_everyone()
    result = {"steps": step, "history": history}
    if accelerator.is_main_process:
        result["cam_miou"] = cam_miou(args, model, processor) if args.eval_split else None
        save_outputs(args, model, selection, result)
    accelerator.end_training()
    if accelerator.is_main_process:
        final = history[-1] if history else {}
        logger.info("done: %d steps, final loss %s, CAM mIoU %s; prompts in %s", step,
                    f"{final['loss']:.4f}" if final else "-",
                    f"{100 * result['cam_miou']:.2f}" if result.get("cam_miou") is not None else "not evaluated",
                    args.output_dir)
    return result


def cam_miou(args, model, processor) -> float | None:
    if not args.eval_split:
        return None
    from pole_hf.evaluation import evaluate_cams

    return evaluate_cams(model, args.eval_set, processor=processor, progress=False)["miou"]


def save_outputs(args, model, selection, result) -> None:
    from pole_hf.hub import PoleEvalResult, render_model_card

    model.save_pretrained(args.output_dir)
    if selection is not None:
        selection.save(os.path.join(args.output_dir, "selection.json"))
    evals = [PoleEvalResult("cam_miou", 100 * result["cam_miou"], args.dataset.split(":")[0], args.eval_split)] \
        if result.get("cam_miou") is not None else []
    settings = {"seed": args.seed, "steps": result["steps"], "global batch": args.train_batch_size,
                "learning rate": args.learning_rate, "loss weights (otm/btm/cbs)": "/".join(
                    f"{float(w):g}" for w in args.loss_weights.split(","))}
    card = render_model_card(model, datasets=[args.dataset.split(":")[0]], eval_results=evals, training=settings)
    atomic_write_text(os.path.join(args.output_dir, "README.md"), str(card))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return training_function(parse_args(argv))
    except (FloatingPointError, ValueError, OSError, ImportError) as err:
        print(f"train_pole.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
