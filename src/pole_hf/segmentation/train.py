"""Train a transformers semantic-segmentation model on pseudo masks (or ground truth), with accelerate.

    accelerate launch -m pole_hf.segmentation.train --dataset synthetic --masks cams/ --output_dir seg/
    accelerate launch examples/train_segmentation.py --dataset voc:/data/VOCdevkit/VOC2012 --masks cams/ \
        --model_name_or_path nvidia/mit-b0 --output_dir seg/ --crop_size 512

The global batch is split across processes (`split_batches`, no padding of the last batch); each process's loss is
its summed pixel cross-entropy over the global count of labelled pixels (times the number of processes, which DDP
averages away) and batch norms sum their statistics over processes, so one and N processes take the same steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..atomic import atomic_write_text
from ..data.spec import SPEC_HELP, class_names_of, iter_examples, load_dataset_spec
from ..evaluation import ConfusionMatrix
from ..hub import HUB_TIMEOUT, hub_timeout, render_segmentation_card
from ..training import (
    add_run_arguments,
    check_trackers,
    latest_checkpoint,
    load_checkpoint,
    log_run_start,
    prune_checkpoints,
    record_step,
    save_checkpoint,
)
from .data import SegmentationTrainSet, load_pseudo_masks
from .modeling import IGNORE_INDEX, build_segmentation_model, convert_batch_norms, set_sample_weights

logger = logging.getLogger("train_segmentation")
SCHEDULES = {"poly": "polynomial", "linear": "linear", "cosine": "cosine", "constant": "constant"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a segmentation model on pseudo masks (WSSS stage 3)")
    parser.add_argument("--dataset", default="synthetic", help=SPEC_HELP + " (val images and ground truth)")
    parser.add_argument("--masks", default=None, help="output_dir of generate_cams.py (pseudo masks); without it "
                        "the model trains on the dataset's ground-truth masks")
    parser.add_argument("--split", default="train", help="training split when training on ground truth")
    parser.add_argument("--num_images", type=int, default=None, help="first N training images")
    parser.add_argument("--eval_split", default="val")
    parser.add_argument("--eval_images", type=int, default=None, help="first N val images (synthetic: 100)")
    parser.add_argument("--image_size", type=int, default=96, help="synthetic images' side")
    parser.add_argument("--world_seed", type=int, default=0, help="seed of the synthetic world (as generate_cams)")
    parser.add_argument("--model_name_or_path", default=None, help="AutoModelForSemanticSegmentation checkpoint "
                        "(e.g. nvidia/mit-b0); default: a SegFormer built from --config_name, offline")
    parser.add_argument("--config_name", default="mit-b0", help="'mit-b0', 'tiny' or a SegformerConfig JSON file")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--crop_size", type=int, default=None, help="training crop side (default: --image_size)")
    parser.add_argument("--scale_range", type=float, nargs=2, default=(0.5, 2.0))
    parser.add_argument("--train_batch_size", type=int, default=16, help="global batch size")
    parser.add_argument("--learning_rate", type=float, default=6e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--lr_scheduler_type", default="poly", choices=sorted(SCHEDULES))
    parser.add_argument("--poly_power", type=float, default=1.0)
    parser.add_argument("--num_warmup_steps", type=int, default=0)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None)
    add_run_arguments(parser)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the last N checkpoints")
    parser.add_argument("--eval_every", type=int, default=0, help="val mIoU every N steps (0: only at the end)")
    parser.add_argument("--push_to_hub", default=None, help="push the model, processor and card to this repo")
    return parser.parse_args(argv)


def load_training_data(args):
    """(train set, val set, class names, pseudo-mask summary or None) for the arguments."""
    summary = None
    if args.masks:
        train = load_pseudo_masks(args.masks)
        summary_path = os.path.join(args.masks, "summary.json")
        if os.path.isfile(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
        if args.num_images is not None:
            train = train.select(range(min(args.num_images, len(train))))
    else:
        train = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.world_seed,
                                  image_size=args.image_size)
    names = class_names_of(train)
    eval_images = args.eval_images or (100 if args.dataset.startswith("synthetic") else None)
    val = load_dataset_spec(args.dataset, split=args.eval_split, num_images=eval_images, seed=args.world_seed,
                            image_size=args.image_size, class_names=names)
    if class_names_of(val) != names:
        raise ValueError(f"the val classes {class_names_of(val)} differ from the training classes {names}")
    return train, val, names, summary


def evaluate(model, processor, dataset, accelerator, num_labels: int) -> ConfusionMatrix:
    """Val confusion matrix of `model` against the ground-truth masks, sharded over processes and summed."""
    matrix = ConfusionMatrix(num_labels, IGNORE_INDEX)
    was_training = model.training
    model.eval()
    shard = range(accelerator.process_index, len(dataset), accelerator.num_processes)
    with torch.no_grad():
        for example in iter_examples(dataset, shard):
            if example.image is None or example.mask is None:
                continue
            inputs = processor(images=example.image, return_tensors="pt").to(accelerator.device)
            outputs = model(pixel_values=inputs["pixel_values"])
            pred = processor.post_process_semantic_segmentation(outputs, target_sizes=[example.mask.shape])[0]
            matrix.update(pred.cpu().numpy(), example.mask)
    model.train(was_training)
    totals = accelerator.reduce(torch.tensor(matrix.matrix, device=accelerator.device), reduction="sum")
    matrix.matrix = totals.cpu().numpy()
    return matrix


def pixel_loss(logits: torch.Tensor, labels: torch.Tensor, total_pixels: int, num_processes: int) -> torch.Tensor:
    """Summed cross-entropy of this process's pixels over the global labelled-pixel count (255 ignored)."""
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    summed = F.cross_entropy(upsampled, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed * num_processes / max(total_pixels, 1)


def training_function(args) -> dict:
    check_trackers(args.report_to)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_dir=args.output_dir,
                              dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False,
                                                                        use_seedable_sampler=True))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log_run_start(logger, accelerator, "train_segmentation")
    if args.train_batch_size % accelerator.num_processes:
        raise ValueError(f"--train_batch_size {args.train_batch_size} is not a multiple of the "
                         f"{accelerator.num_processes} processes; pick a multiple")
    set_seed(args.seed)
    train, val, names, summary = load_training_data(args)
    model, processor = build_segmentation_model(names, args.model_name_or_path, args.config_name,
                                                args.crop_size or args.image_size)
    if accelerator.num_processes > 1:
        convert_batch_norms(model)  # statistics over the global batch, on any backend (gloo included)
    crop = args.crop_size or args.image_size
    data = SegmentationTrainSet(train, processor, crop, tuple(args.scale_range), seed=args.seed)
    loader = DataLoader(data, batch_size=args.train_batch_size, shuffle=True, collate_fn=data.collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  eps=args.adam_epsilon)
    steps_per_epoch = len(loader)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    extra = {"power": args.poly_power} if args.lr_scheduler_type == "poly" else None
    scheduler = get_scheduler(SCHEDULES[args.lr_scheduler_type], optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=max_steps, scheduler_specific_kwargs=extra)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if args.report_to:
        accelerator.init_trackers("segmentation", config={k: v for k, v in vars(args).items()
                                                          if isinstance(v, (int, float, str, bool))})
    step, start_epoch, skip = 0, 0, 0
    if args.resume_from_checkpoint:
        path = latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest" \
            else args.resume_from_checkpoint
        if path:
            step = load_checkpoint(accelerator, path)  # nothing in it is unpickled
            start_epoch, skip = divmod(step, steps_per_epoch)
            logger.info("resumed from %s (step %d)", path, step)
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process, desc="segmentation")
    history, num_labels = [], len(names) + 1
    model.train()
    for epoch in range(start_epoch, epochs):
        data.epoch = epoch
        loader.set_epoch(epoch)
        first = skip if epoch == start_epoch else 0
        batches = iter(accelerator.skip_first_batches(loader, first) if first else loader)
        for _ in range(first, steps_per_epoch):
            if step >= max_steps:
                break
            # the last global batch may leave a process without images: it runs one all-ignored stand-in, left out
            # of the loss and of the batch-norm statistics, so that it still joins the collective calls
            batch = next(batches, None)
            pixels, labels = batch if batch is not None else data.collate([data.blank()])
            pixels, labels = pixels.to(accelerator.device), labels.to(accelerator.device)
            if accelerator.num_processes > 1:
                set_sample_weights(model, torch.full((len(pixels),), float(batch is not None),
                                                     device=accelerator.device))
            counted = torch.tensor((labels != IGNORE_INDEX).sum().item(), device=accelerator.device)
            total = int(accelerator.reduce(counted, reduction="sum"))
            with accelerator.autocast():
                logits = model(pixel_values=pixels).logits
            loss = pixel_loss(logits.float(), labels, total, accelerator.num_processes)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {step + 1}: lower --learning_rate; "
                                         f"the last checkpoint in {args.output_dir} is intact")
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            logs = {"loss": accelerator.reduce(loss.detach(), "sum").item() / accelerator.num_processes,
                    "lr": scheduler.get_last_lr()[0]}
            record_step(accelerator, progress, history, logs, step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, step)
                if accelerator.is_main_process:
                    prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
            if args.eval_every and step % args.eval_every == 0:
                value = evaluate(model, processor, val, accelerator, num_labels).miou()
                accelerator.log({"val_miou": value}, step=step)
                if accelerator.is_main_process:
                    logger.info("step %d: val mIoU %.2f", step, 100 * value)
    progress.close()
    set_sample_weights(model, None)
    matrix = evaluate(accelerator.unwrap_model(model), processor, val, accelerator, num_labels)
    result = {"steps": step, "history": history, "val_miou": matrix.miou(), "val_images": len(val),
              "train_images": len(train), "per_class_iou": dict(zip(["background", *names], map(float, matrix.iou()))),
              "pseudo_mask_miou": (summary or {}).get("miou"), "masks_from": (summary or {}).get("model"),
              "skipped": sorted(set(data.skipped))}
    accelerator.log({"val_miou": result["val_miou"]}, step=step)
    if accelerator.is_main_process:
        logger.info("val mIoU %.2f on %d images\n%s", 100 * result["val_miou"], len(val),
                    matrix.as_table(["background", *names]))
        save_outputs(args, accelerator.unwrap_model(model), processor, result)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def save_outputs(args, model, processor, result: dict) -> None:
    """save_pretrained of the model and its processor, results.json, the model card; push when asked."""
    from huggingface_hub import HfApi

    repo_id = None
    if args.push_to_hub:  # the full repo id (namespace included) goes into the card's usage snippet
        with hub_timeout(HUB_TIMEOUT, f"creating {args.push_to_hub}"):
            repo_id = HfApi().create_repo(args.push_to_hub, exist_ok=True).repo_id
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    atomic_write_text(os.path.join(args.output_dir, "results.json"),
                      json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    training = {"seed": args.seed, "steps": result["steps"], "global batch": args.train_batch_size,
                "learning rate": args.learning_rate, "schedule": args.lr_scheduler_type,
                "crop": args.crop_size or args.image_size, "training images": result["train_images"],
                "masks": "pseudo masks" if args.masks else "ground truth"}
    card = render_segmentation_card(model, dataset=args.dataset.split(":")[0], val_miou=100 * result["val_miou"],
                                    val_split=args.eval_split, val_images=result["val_images"],
                                    pseudo_mask_miou=None if result["pseudo_mask_miou"] is None
                                    else 100 * result["pseudo_mask_miou"],
                                    masks_from=result["masks_from"] if args.masks else "ground truth",
                                    repo_id=repo_id, base_model=args.model_name_or_path, training=training)
    card.save(os.path.join(args.output_dir, "README.md"))
    if args.push_to_hub:
        with hub_timeout(HUB_TIMEOUT, f"pushing to {repo_id}"):
            HfApi().upload_folder(repo_id=repo_id, folder_path=args.output_dir,
                                  ignore_patterns=["checkpoint_*", "*.partial"],
                                  commit_message="Upload segmentation model trained with pole_hf")


def main(argv=None) -> dict:
    try:
        return training_function(parse_args(argv))
    except (FloatingPointError, ValueError, OSError, ImportError) as err:
        print(f"train_segmentation: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
