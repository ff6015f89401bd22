"""`pole-hf demo`: POLE's claim, measured offline on the bundled tiny CLIP and the synthetic world.

The ground-truth class word is often not the word that gives the best CAM. The demo computes CAMs on a held-out
synthetic split with (a) the official class names, (b) POLE's selected words and (c) the shipped learned class
tokens, and prints CAM and pseudo-mask mIoU per class, writes overlays and a bar chart. `--full` adds the paper's
own route (a CAM network trained through the frozen tiny CLIP: classification stage, CLIMS, POLE's per-pair words)
and a segmentation model per prompt variant.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_save_png, atomic_write_text
from .bundled import TINY_CLIP, TINY_PROMPTS
from .cam_inference import image_cams
from .data import SyntheticWorld, load_synthetic
from .evaluation import evaluate_cams
from .image_processing_pole import PoleImageProcessor
from .masks import cams_to_mask, overlay_mask
from .modeling_pole import PolePromptModel
from .selection import select_class_words

VARIANT_COLOURS = {"official names": (150, 150, 150), "selected words": (70, 130, 200), "learned tokens": (220, 120, 40),
                   "learned context": (120, 180, 90), "learned class tokens": (200, 80, 120),
                   "CAM network (classification)": (90, 90, 90), "CAM network (CLIMS)": (60, 160, 160),
                   "CAM network (POLE)": (150, 90, 200)}
CAM_NETWORK_OPTIONS = ("--num_images", "320")
"""`--full`'s CAM-network runs (`pole_hf.cam_network_training` flags; the rest are its synthetic defaults)."""


def demo_models(base: str | None = None, selection_images: int = 60, progress: bool = True) -> dict:
    """The three prompt variants on the bundled tiny CLIP (or `base`): official names, selected words, learned."""

    world = SyntheticWorld()
    official = PolePromptModel.from_clip(base or TINY_CLIP, class_names=world.class_names,
                                         background_words=world.background_kinds)
    selected = PolePromptModel.from_clip(base or TINY_CLIP, class_names=world.class_names,
                                         background_words=world.background_kinds)
    candidates = world.candidates
    pool = load_synthetic(num_images=selection_images, seed=1, image_size=official.clip.config.vision_config.image_size,
                          split="selection")
    result = select_class_words(selected, pool, candidates=candidates, processor=PoleImageProcessor.for_model(selected),
                                progress=progress)
    result.apply(selected)
    models = {"official names": official, "selected words": selected}
    if base is None and os.path.isfile(os.path.join(TINY_PROMPTS, "model.safetensors")):
        models["learned tokens"] = PolePromptModel.from_pretrained(TINY_PROMPTS)
    return {"models": models, "selection": result}


def crf_available() -> bool:
    """Whether the optional dense CRF (`pip install pole_hf[crf]`) is installed."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def bar_chart(rows: dict[str, dict[str, float]], path: str, title: str) -> None:
    """Grouped bars of per-class IoU (%) per variant, drawn with PIL; class names in full, a legend of variants."""
    variants = list(rows)
    classes = list(next(iter(rows.values())))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(probe.textlength(name) for name in classes)
    legend_width = max(probe.textlength(variant) for variant in variants) + 30
    bar, height, top = 10, 220, 30
    group = max(len(variants) * bar, label_width) + 16
    width = int(60 + len(classes) * group + legend_width + 20)
    image = Image.new("RGB", (width, height + top + 60), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    plot_right = width - legend_width - 20
    for level in (0, 25, 50, 75, 100):
        y = top + height - level * height / 100
        draw.line([(50, y), (plot_right, y)], fill=(225, 225, 225))
        draw.text((20, y - 6), str(level), fill="black")
    for c, name in enumerate(classes):
        x0 = 60 + c * group
        for v, variant in enumerate(variants):
            value = rows[variant][name]
            value = 0.0 if np.isnan(value) else value
            x = x0 + v * bar
            draw.rectangle([x, top + height - value * height / 100, x + bar - 2, top + height],
                           fill=VARIANT_COLOURS.get(variant, (100, 100, 100)))
        draw.text((x0, top + height + 6), name, fill="black")
    for v, variant in enumerate(variants):
        y = top + 10 + v * 18
        x = plot_right + 10
        draw.rectangle([x, y, x + 10, y + 10], fill=VARIANT_COLOURS.get(variant, (100, 100, 100)))
        draw.text((x + 15, y), variant, fill="black")
    atomic_save_png(path, image)


def captioned_strip(tiles: list[Image.Image], captions: list[str], footer: str, scale: int = 2) -> Image.Image:
    """Tiles side by side (scaled up), each captioned below, with a footer line (e.g. the image's labels)."""
    width, height = tiles[0].width * scale, tiles[0].height * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tile_width = int(max(width, *(probe.textlength(c) + 8 for c in captions)))
    strip = Image.new("RGB", (tile_width * len(tiles), height + 34), "white")
    draw = ImageDraw.Draw(strip)
    for position, (tile, caption) in enumerate(zip(tiles, captions)):
        strip.paste(tile.resize((width, height), Image.NEAREST), (position * tile_width, 0))
        draw.text((position * tile_width + 4, height + 4), caption, fill="black")
    draw.text((4, height + 19), footer, fill=(80, 80, 80))
    return strip


def run_demo(output_dir: str = "pole-demo", num_images: int = 100, base: str | None = None, seed: int = 7,
             progress: bool = True, selection_images: int = 60, full: bool = False,
             run_options: Sequence[str] = (), extra_models: dict | None = None,
             camnet_options: Sequence[str] = CAM_NETWORK_OPTIONS) -> dict:
    """Run the demo and write `results.json`, `iou.png` and overlays into `output_dir`; returns the results.
    With `full=True` the CAM-network route adds its columns (a classification-stage network, then CLIMS and POLE
    second stages from it, `camnet_options` passed to each stage) and each prompt variant's pseudo masks train a
    segmentation model (`pole-hf run --prompts`, `run_options`), whose val mIoU is the table's last row (beyond the
    demo's 5-minute budget: ~10 minutes per variant). `extra_models` (`{name: PolePromptModel}`) adds columns."""

    start = time.time()
    print("pole-hf demo: runs offline on the tiny CLIP bundled with pole_hf and the synthetic world "
          f"({num_images} held-out images). For a real CLIP, use PolePromptModel.from_clip('openai/clip-vit-base-"
          "patch16', class_names=...) and pipeline('pole-cam', model=...) on your own images.")
    os.makedirs(output_dir, exist_ok=True)
    built = demo_models(base, selection_images=selection_images, progress=progress)
    models = {**built["models"], **(extra_models or {})}
    first = next(iter(models.values()))
    size = first.clip.config.vision_config.image_size
    heldout = load_synthetic(num_images=num_images, seed=seed, image_size=size, split="test")
    processor = PoleImageProcessor.for_model(first)
    use_crf = crf_available()
    results = {}
    for variant, model in models.items():
        cam = evaluate_cams(model, heldout, processor=processor, crf=use_crf, progress=progress)
        mask = cam["pseudo_mask"] if use_crf else evaluate_cams(model, heldout, processor=processor, refine=True,
                                                                  progress=progress)
        results[variant] = {"cam_miou": 100 * cam["miou"], "mask_miou": 100 * mask["miou"],
                            "cam_iou": {k: 100 * v for k, v in cam["per_class_iou"].items()},
                            "words": dict(zip(model.config.class_names, model.config.class_words))}
    if full:
        options = [*camnet_options, *(["--base", base] if base else [])]
        results.update(_cam_network_columns(output_dir, num_images, seed, use_crf, options, progress))
    classes = list(results[next(iter(results))]["cam_iou"])
    header = "| class | " + " | ".join(results) + " |"
    lines = [header, "|" + "---|" * (len(results) + 1)]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(f"{r['cam_iou'][name]:.1f}" for r in results.values()) + " |")
    lines.append("| **CAM mIoU** | " + " | ".join(f"**{r['cam_miou']:.1f}**" for r in results.values()) + " |")
    how = "CRF" if use_crf else "CAA; install pole_hf[crf] for CRF"
    lines.append(f"| **pseudo-mask mIoU ({how})** | " + " | ".join(f"**{r['mask_miou']:.1f}**" for r in
                                                                   results.values()) + " |")
    if full:
        seg = _segmentation_column(models, output_dir, run_options)
        for variant, value in seg.items():
            results[variant]["seg_miou"] = value
        lines.append("| **segmentation val mIoU** | " + " | ".join(
            f"**{seg[v]:.1f}**" if v in seg else "-" for v in results) + " |")
    table = "\n".join(lines)
    print(table)
    print("selected words:", json.dumps(built["selection"].winners))
    bar_chart({v: r["cam_iou"] for v, r in results.items()}, os.path.join(output_dir, "iou.png"),
              "CAM IoU per class (%) on held-out synthetic images")
    _write_overlays(models, heldout, processor, output_dir, overlay_mask)
    atomic_write_text(os.path.join(output_dir, "results.json"),
                      json.dumps({"results": results, "table": table, "seconds": time.time() - start}, indent=2))
    print(f"wrote {output_dir}/iou.png, overlays and results.json in {time.time() - start:.0f} s")
    return results


def _cam_network_columns(output_dir: str, num_images: int, seed: int, use_crf: bool, options: Sequence[str],
                         progress: bool) -> dict:
    """The CAM-network route on the same held-out split (rendered at the network's 128 px): a classification
    network, then a CLIMS and a POLE second stage from it, POLE's per-pair words chosen on the CLIMS network's CAMs
    (the better source on the synthetic world: benchmarks/README.md, "CAM network on the synthetic world")."""
    from . import PoleCamNetwork
    from .cam_network_training import SYNTHETIC_IMAGE_SIZE
    from .cam_network_training import main as train

    work = os.path.join(output_dir, "cam_network")
    common = ["--dataset", "synthetic", "--cpu", *options]
    stage1 = os.path.join(work, "classification")
    train(["--stage", "classification", *common, "--output_dir", stage1])
    clims, pole = os.path.join(work, "clims"), os.path.join(work, "pole")
    train(["--stage", "clims", *common, "--variant", "clims", "--init_network", stage1, "--output_dir", clims])
    train(["--stage", "select", *common, "--init_network", clims, "--output_dir", os.path.join(work, "select")])
    selection = os.path.join(work, "select", "selection.json")
    train(["--stage", "clims", *common, "--variant", "pole", "--selection", selection, "--init_network", stage1,
           "--output_dir", pole])
    runs = {"CAM network (classification)": stage1, "CAM network (CLIMS)": clims, "CAM network (POLE)": pole}
    heldout = load_synthetic(num_images=num_images, seed=seed, image_size=SYNTHETIC_IMAGE_SIZE, split="test")
    columns = {}
    for variant, folder in runs.items():
        cam = evaluate_cams(PoleCamNetwork.from_pretrained(folder), heldout, crf=use_crf, progress=progress)
        mask = cam["pseudo_mask"] if use_crf else cam  # without the CRF a network's masks are its CAMs (no CAA)
        columns[variant] = {"cam_miou": 100 * cam["miou"], "mask_miou": 100 * mask["miou"],
                            "cam_iou": {k: 100 * v for k, v in cam["per_class_iou"].items()}, "network": folder}
    return columns


def _segmentation_column(models: dict, output_dir: str, run_options: Sequence[str] = ()) -> dict[str, float]:
    """Val mIoU (%) of a segmentation model trained on each variant's pseudo masks, via `pole-hf run --prompts`
    (`run_options`: more `pole-hf run` flags, e.g. fewer steps)."""
    from .cli import build_parser
    from .run import run_pipeline

    values = {}
    for variant, model in models.items():
        slug = variant.replace(" ", "-")
        prompts = os.path.join(output_dir, "segmentation", slug, "prompts")
        model.save_pretrained(prompts)
        args = build_parser().parse_args(["run", "--prompts", prompts, "--run_dir",
                                          os.path.join(output_dir, "segmentation", slug), *run_options])
        values[variant] = run_pipeline(args)["val_miou"]
    return values


def _write_overlays(models, dataset, processor, output_dir, overlay_mask, count: int = 4) -> None:

    for index in range(min(count, len(dataset))):
        item = dataset[index]
        image, labels = item["image"].convert("RGB"), sorted(set(item["labels"]))
        tiles = [image]
        for model in models.values():
            cams = image_cams(model, processor, image, labels).cams.numpy()
            tiles.append(overlay_mask(image, cams_to_mask(cams, [i + 1 for i in labels])))
        names = dataset.features["labels"].feature.names
        footer = "labels: " + ", ".join(names[i] for i in labels) if labels else "labels: none"
        atomic_save_png(os.path.join(output_dir, f"overlay_{index}.png"), captioned_strip(tiles, ["image", *models],
                                                                                         footer))
