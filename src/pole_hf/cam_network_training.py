"""Training a CAM network (the paper's route) with accelerate; `examples/train_cam_network.py` runs this.

    accelerate launch examples/train_cam_network.py --stage classification --dataset voc:/data/VOC2012 \
        --backbone microsoft/resnet-50 --output_dir out/cam
    accelerate launch examples/train_cam_network.py --stage clims --variant pole --selection out/selection.json \
        --init_network out/cam --base openai/clip-vit-base-patch32 --dataset voc:/data/VOC2012 --output_dir out/pole

Stage `classification`: IRN's `train_cam` (multi-label soft margin on pooled logits). Stage `clims`: the network's
sigmoid maps mask the images, frozen CLIP scores them (`pole_hf.cam_network_objective`). The global batch is split
across processes; each process's mean losses are scaled by its share of the global count and gradients are summed
by hand, so any number of processes (and an uneven last batch) gives the one-process update. BatchNorm is frozen.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .augmentation import ScaleFlipCrop
from .bundled import TINY_CLIP
from .cam_inference import batched_cams
from .cam_network_objective import (
    CLASSIFICATION_SETTINGS,
    CLIMS_BACKGROUND_WORDS,
    CLIMS_SETTINGS,
    PROMPT_VARIANTS,
    TINY_CLASSIFICATION_SETTINGS,
    TINY_CLIMS_SETTINGS,
    CamNetworkObjective,
    freeze_for_variant,
    variant_options,
)
from .configuration_pole_cam_network import PoleCamNetworkConfig, tiny_resnet_config
from .data import SyntheticWorld
from .data.spec import SPEC_HELP, class_names_of, iter_examples, load_dataset_spec
from .evaluation import evaluate_cams
from .image_processing_pole import PoleImageProcessor
from .modeling_pole import PolePromptModel
from .modeling_pole_cam_network import PoleCamNetwork
from .selection import SelectionResult, load_candidates, select_class_words, with_pair_words
from .training import (
    PixelDataset,
    add_run_arguments,
    check_trackers,
    epoch_batches,
    latest_checkpoint,
    load_checkpoint,
    log_run_start,
    save_checkpoint,
)
from .vocab import VOC_PROMPT_WORDS

logger = logging.getLogger("train_cam_network")
SYNTHETIC_IMAGE_SIZE = 128
"""Network input side for the synthetic world (the tiny CLIP sees the masked images at its own 64 px)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="CAM network training (IRN classification, then CLIMS / POLE)")
    parser.add_argument("--stage", default="clims", choices=["classification", "select", "clims"],
                        help="select: POLE's per-(image, class) words on --init_network's CAMs, written to "
                             "OUTPUT_DIR/selection.json")
    parser.add_argument("--candidates", default=None, help="JSON {class: [words]} for --stage select (default: "
                                                           "POLE's VOC synonyms, the synthetic world's words)")
    parser.add_argument("--variant", default="clims", choices=PROMPT_VARIANTS,
                        help="clims: official names; coop: learned context; defo: learned context + one vector per "
                             "class (the name's first token); pole: each (image, class) pair's selected word "
                             "(--selection)")
    parser.add_argument("--use_adapters", action="store_true", help="POLE's learnable-ratio adapters")
    parser.add_argument("--selection", default=None, help="selection.json of per-(image, class) words (variant pole)")
    parser.add_argument("--dataset", default="synthetic", help=SPEC_HELP)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=None, help="first N training images")
    parser.add_argument("--image_size", type=int, default=None, help="network input side (synthetic: 128)")
    parser.add_argument("--eval_split", default=None, help="evaluate CAM mIoU on this split at the end")
    parser.add_argument("--eval_images", type=int, default=50)
    parser.add_argument("--backbone", default=None,
                        help="transformers ResNet id or folder (default microsoft/resnet-50; 'tiny' for a small "
                             "random ResNet, the synthetic world's default)")
    parser.add_argument("--init_network", default=None, help="start from a saved PoleCamNetwork (stage 1's output)")
    parser.add_argument("--base", default=None, help="base CLIP id or folder (default: the bundled tiny CLIP)")
    parser.add_argument("--prompts", default=None, help="start from saved prompts instead of the class names")
    parser.add_argument("--background_words", nargs="*", default=None, help="default: CLIMS's ten")
    parser.add_argument("--loss_weights", default=None, help="OTM,BTM,CBS weights (10,25,1)")
    parser.add_argument("--loss_image_feature", default="pooled", choices=["pooled", "patch_mean"],
                        help="CLIP image feature the losses score (CLIMS: pooled)")
    parser.add_argument("--area_weight", type=float, default=None, help="CLIMS's mean(map) term (0 in POLE)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_batch_size", type=int, default=None, help="global batch size")
    parser.add_argument("--learning_rate", type=float, default=None, help="backbone rate (poly decay)")
    parser.add_argument("--classifier_lr_factor", type=float, default=None)
    parser.add_argument("--prompt_lr_factor", type=float, default=None)
    parser.add_argument("--weight_decay", type=float, default=None)
    parser.add_argument("--poly_power", type=float, default=None)
    parser.add_argument("--num_train_epochs", type=int, default=None)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--resize_long", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="random longer side of the training images (reference 320 640; synthetic: scaled to "
                             "--image_size, 80 160 at 128 px)")
    parser.add_argument("--crop_size", type=int, default=None,
                        help="random square crop (reference 512; synthetic: --image_size)")
    parser.add_argument("--no_flip", action="store_true", help="no random horizontal flip")
    parser.add_argument("--no_augmentation", action="store_true",
                        help="train on the images resized to --image_size, without rescale, flip or crop")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    synthetic = args.dataset.startswith("synthetic")
    if args.stage == "select" and not args.init_network:
        parser.error("--stage select needs --init_network (the network whose CAMs mask the images)")
    if args.stage == "classification":
        defaults = TINY_CLASSIFICATION_SETTINGS if synthetic else CLASSIFICATION_SETTINGS
    else:
        defaults = TINY_CLIMS_SETTINGS if synthetic and args.base is None else CLIMS_SETTINGS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.image_size is None:
        args.image_size = SYNTHETIC_IMAGE_SIZE if synthetic else 320
    if args.backbone is None:
        args.backbone = "tiny" if synthetic else "microsoft/resnet-50"
    if not args.no_augmentation and args.stage != "select":
        reference = ScaleFlipCrop.scaled_for(args.image_size) if synthetic else ScaleFlipCrop()
        args.resize_long = tuple(args.resize_long or reference.long_side)
        args.crop_size = args.crop_size or reference.crop_size
        try:
            ScaleFlipCrop(long_side=args.resize_long, crop_size=args.crop_size)
        except ValueError as err:
            parser.error(f"--resize_long / --crop_size: {err}")
    if args.stage == "clims" and args.variant == "pole" and args.selection is None:
        parser.error("--variant pole needs --selection selection.json (pole-hf select or "
                     "pole_hf.selection.select_class_words with the network's CAMs)")
    return args


def collate(batch, size: int):
    pixels = torch.stack([b[0] for b in batch]) if batch else torch.zeros(0, 3, size, size)
    return pixels, [b[1] for b in batch], [b[2] for b in batch]


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean) / std


def build_network(args, class_names):
    if args.init_network:
        network = PoleCamNetwork.from_pretrained(args.init_network)
        if network.config.class_names != list(class_names):
            raise ValueError(f"--init_network {args.init_network} has classes {network.config.class_names}, the "
                             f"dataset {list(class_names)}: train stage 1 on this dataset")
        return network
    if args.backbone == "tiny":
        return PoleCamNetwork(PoleCamNetworkConfig(backbone_config=tiny_resnet_config(), class_names=class_names))
    return PoleCamNetwork.from_backbone(args.backbone, class_names)


def build_prompt_model(args, class_names):
    if args.prompts:
        return PolePromptModel.from_pretrained(args.prompts)
    options = variant_options(args.variant, args.use_adapters)
    if args.background_words is not None:
        options["background_words"] = args.background_words
    elif args.dataset.startswith("synthetic"):
        options["background_words"] = SyntheticWorld().background_kinds
    else:
        options["background_words"] = list(CLIMS_BACKGROUND_WORDS)
    if args.dataset.startswith("voc"):
        options["class_words"] = [VOC_PROMPT_WORDS.get(n, n) for n in class_names]
    return PolePromptModel.from_clip(args.base or TINY_CLIP, class_names=class_names, **options)


def load_training_set(args):
    train_set = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                  image_size=args.image_size)
    if args.selection:
        train_set = with_pair_words(train_set, SelectionResult.load(args.selection))
    return train_set


def select_pair_words(network, prompt_model, dataset, candidates=None, progress: bool = True):
    """POLE's selection per (image, class) with the CAM network's CAMs masking the images (base CLIP scores).

    Returns the [`SelectionResult`]; `pole_hf.selection.with_pair_words` writes its words beside the dataset.
    """
    items = [(e.image, list(dict.fromkeys(e.labels)), e.id) for e in iter_examples(dataset)]
    labelled = [i for i, item in enumerate(items) if item[1]]
    computed = batched_cams(network.eval(), PoleImageProcessor.for_model(network), [items[i][0] for i in labelled],
                            [items[i][1] for i in labelled])
    cams = [torch.zeros(0, 1, 1)] * len(items)
    for i, output in zip(labelled, computed):
        cams[i] = output.cams
    return select_class_words(prompt_model, items, candidates=candidates, cams=cams, progress=progress)


def run_selection(args) -> dict:
    """`--stage select`: per-pair words over the training rows, written to OUTPUT_DIR/selection.json."""
    train_set = load_dataset_spec(args.dataset, split=args.split, num_images=args.num_images, seed=args.seed,
                                  image_size=args.image_size)
    class_names = class_names_of(train_set)
    network = build_network(args, class_names)
    prompt_model = build_prompt_model(args, class_names)
    result = select_pair_words(network, prompt_model, train_set, load_candidates(args.candidates, args.dataset))
    os.makedirs(args.output_dir, exist_ok=True)
    result.save(os.path.join(args.output_dir, "selection.json"))
    print(f"train_cam_network: {len(result.choices)} (image, class) words in {args.output_dir}/selection.json; "
          f"dataset vote {result.winners}")
    return {"selection": result}


def training_data(args, train_set, fill) -> PixelDataset:
    """The training images in [0, 1] (both normalisations come later): augmented (rescale, flip, crop, seeded by
    the run's seed, the epoch and the image's index) unless `--no_augmentation`."""
    if args.no_augmentation:
        return PixelDataset(train_set, (args.image_size, args.image_size))
    augment = ScaleFlipCrop(long_side=tuple(args.resize_long), flip=not args.no_flip, crop_size=args.crop_size,
                            fill=tuple(fill), seed=args.seed)
    return PixelDataset(train_set, (args.crop_size, args.crop_size), augment=augment)


def reduce_grads(accelerator, params) -> None:
    """Sum every parameter's gradient over the processes (a missing one counts as zeros on that process)."""
    for param in params:
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        param.grad = accelerator.reduce(grad, "sum")


def training_function(args) -> dict:
    check_trackers(args.report_to)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_dir=args.output_dir)
    line = log_run_start(logger, accelerator, "train_cam_network")
    if accelerator.is_main_process:
        variant = f", variant {args.variant}{' + adapters' if args.use_adapters else ''}" if args.stage == "clims" \
            else ""
        augmentation = "no augmentation" if args.no_augmentation else (
            f"augmentation: long side {args.resize_long[0]}-{args.resize_long[1]}, "
            f"{'no flip' if args.no_flip else 'flip'}, crop {args.crop_size}")
        print(f"{line}, stage {args.stage}{variant}, {augmentation}", flush=True)
    set_seed(args.seed)
    train_set = load_training_set(args)
    class_names = class_names_of(train_set)
    network = build_network(args, class_names).to(accelerator.device)
    prompt_model, prompt_params, objective = None, [], None
    if args.stage == "clims":
        prompt_model = build_prompt_model(args, class_names).to(accelerator.device)
        prompt_params = freeze_for_variant(prompt_model, args.variant)
        otm, btm, cbs = (float(w) for w in args.loss_weights.split(","))
        objective = CamNetworkObjective(weights={"otm": otm, "btm": btm, "cbs": cbs},
                                        image_feature=args.loss_image_feature)
        if args.variant == "pole" and "class_words" not in train_set.column_names:
            raise ValueError("variant pole needs per-pair words: --selection selection.json")
    data = training_data(args, train_set, network.config.image_mean)
    backbone, classifier = network.parameter_groups()
    groups = [{"params": backbone, "lr": args.learning_rate},
              {"params": classifier, "lr": args.learning_rate * args.classifier_lr_factor}]
    if prompt_params:
        groups.append({"params": prompt_params, "lr": args.learning_rate * args.prompt_lr_factor})
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.SGD(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(data) / args.train_batch_size)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / max_steps) ** args.poly_power)
    # the network is not wrapped in DDP: every process scales its loss by its share, gradients are summed below
    optimizer = accelerator.prepare(optimizer)  # the scheduler stays unprepared: it steps once per global step
    owned = {"network": network}  # modules outside prepare, stored as safetensors in every checkpoint
    if prompt_model is not None:
        for name in ("prompt_learner", "visual_adapter", "text_adapter"):
            if getattr(prompt_model, name) is not None:
                owned[name] = getattr(prompt_model, name)
    if args.report_to:
        accelerator.init_trackers("pole_cam_network", config={k: v for k, v in vars(args).items()
                                                              if isinstance(v, (int, float, str, bool))})
    clip_norm = None
    if prompt_model is not None:
        processor = PoleImageProcessor.for_model(prompt_model)
        clip_norm = (processor.image_mean, processor.image_std)
    step, start_epoch, skip = 0, 0, 0
    if args.resume_from_checkpoint:
        path = latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest" \
            else args.resume_from_checkpoint
        if path:
            step = load_checkpoint(accelerator, path, owned)
            for _ in range(step):  # the poly rate is a function of the step alone
                scheduler.step()
            start_epoch, skip = divmod(step, steps_per_epoch)
    network.train()
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process, desc=args.stage)
    history = []
    try:
        for epoch in range(start_epoch, epochs):
            parts = epoch_batches(len(data), args.train_batch_size, args.seed, epoch, accelerator.process_index,
                                  accelerator.num_processes)
            data.set_epoch(epoch)
            for part in parts[skip if epoch == start_epoch else 0:]:
                if step >= max_steps:
                    break
                pixels, labels, words = collate([data[i] for i in part], data.size[0])
                pixels = pixels.to(accelerator.device)
                logs = train_step(args, accelerator, network, prompt_model, objective, pixels, labels, words,
                                  clip_norm)
                optimizer.zero_grad()
                accelerator.backward(logs.pop("_loss"))
                reduce_grads(accelerator, params)
                optimizer.step()
                if not all(torch.isfinite(p).all() for p in params):
                    raise FloatingPointError(f"the weights became NaN/Inf at step {step + 1}: lower --learning_rate;"
                                             f" the last checkpoint in {args.output_dir} is intact")
                scheduler.step()
                step += 1
                logs["lr"] = scheduler.get_last_lr()[0]
                history.append(logs)
                accelerator.log(logs, step=step)
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.3f}")
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, step, owned)
    finally:
        progress.close()
    accelerator.wait_for_everyone()
    result = {"steps": step, "history": history, "skipped": data.skipped}
    if accelerator.is_main_process:
        network.eval()
        network.save_pretrained(args.output_dir)
        if prompt_params:
            prompt_model.save_pretrained(os.path.join(args.output_dir, "prompts"))
        result["cam_miou"] = evaluate(args, network) if args.eval_split else None
    accelerator.end_training()
    return result


def train_step(args, accelerator, network, prompt_model, objective, pixels, labels, words, clip_norm) -> dict:
    """One step's loss (already scaled by this process's share) and its logged terms."""
    config = network.config
    local = len(labels) if prompt_model is None else sum(len(ls) for ls in labels)
    total = max(int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum")), 1)
    share = local / total
    if not labels:  # this process's part of an uneven last batch is empty: it adds nothing
        zero = sum(p.sum() * 0.0 for p in network.parameters() if p.requires_grad)
        return {"_loss": zero, "loss": accelerator.reduce(zero.detach(), "sum").item()}
    with accelerator.autocast():
        out = network(normalise(pixels, config.image_mean, config.image_std).to(network.dtype))
    if prompt_model is None:
        target = torch.zeros(len(labels), config.num_classes, device=pixels.device)
        for i, classes in enumerate(labels):
            target[i, classes] = 1.0
        loss = F.multilabel_soft_margin_loss(out.logits.float(), target) * share if len(labels) \
            else out.logits.sum() * 0.0
        terms = {}
    else:
        pair_words = words if args.variant == "pole" else None
        if pair_words is not None and any(len(w) != len(ls) for w, ls in zip(words, labels)):
            raise ValueError("the selection's words do not match the images' labels: re-run the selection on this "
                             "dataset")
        losses = objective(prompt_model, out.probability_maps.float(),
                           normalise(pixels, *clip_norm), labels, pair_words)
        w = objective.weights
        loss = share * (w["otm"] * losses.otm + w["btm"] * losses.btm
                        + args.area_weight * out.probability_maps.float().mean()) + w["cbs"] * losses.cbs
        terms = {"otm": losses.otm.item(), "btm": losses.btm.item(), "cbs": losses.cbs.item()}
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss.item()}: lower --learning_rate; the last checkpoint in "
                                 f"{args.output_dir} is intact")
    return {"_loss": loss, "loss": accelerator.reduce(loss.detach(), "sum").item(), **terms}


def evaluate(args, network) -> float | None:
    data = load_dataset_spec(args.dataset, split=args.eval_split, num_images=args.eval_images, seed=0,
                             image_size=args.image_size, class_names=network.config.class_names)
    return evaluate_cams(network, data, progress=False)["miou"]


def main(argv=None):
    """The script's entry point: INFO logs (the run's first line names its processes), one-line errors."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        return run_selection(args) if args.stage == "select" else training_function(args)
    except (FloatingPointError, ValueError, OSError, ImportError) as err:
        print(f"train_cam_network.py: error: {str(err).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
