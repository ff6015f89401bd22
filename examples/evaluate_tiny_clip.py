#!/usr/bin/env python
"""Evaluate a tiny CLIP on held-out synthetic images: zero-shot exact-set accuracy and CAM mIoU, official names
against the frequent caption words.

Zero-shot exact-set accuracy is caption retrieval over all label sets of 1-3 classes; CAM mIoU (background included,
ground-truth labels) goes through ``PolePromptModel.from_clip`` and ``PolePromptModel.get_cams`` exactly as inference does.
``train_tiny_clip.py`` runs this at the end of training; on its own::

    python examples/evaluate_tiny_clip.py --model_dir src/pole_hf/assets/tiny-clip --eval_images 300
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from pole_hf.data.synthetic import SyntheticWorld, generate


# ------------------------------------------------------------------------------------------------ data and features
def make_data(num_images: int, seed: int, image_size: int, split: str, world: SyntheticWorld):
    images = np.zeros((num_images, image_size, image_size, 3), np.uint8)
    masks = np.zeros((num_images, image_size, image_size), np.uint8)
    labels, captions, backgrounds = [], [], []
    for i, sample in enumerate(tqdm(generate(num_images, seed=seed, image_size=image_size, split=split, world=world),
                                    total=num_images, desc=f"generate {split}", mininterval=5)):
        images[i], masks[i] = sample["image"], sample["mask"]
        labels.append(tuple(sample["labels"]))
        captions.append(sample["caption"])
        backgrounds.append(sample["background"])
    return {"images": images, "masks": masks, "labels": labels, "captions": captions, "backgrounds": backgrounds}


def tokenize(tokenizer, texts, max_length):
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def text_features(model: CLIPModel, ids, attn):
    out = model.text_model(input_ids=ids, attention_mask=attn)
    return model.text_projection(out.pooler_output)


def patch_features(model: CLIPModel, pixels):
    """Projected post-layernormed patch tokens [B, N, P] (their mean is the patch_mean image feature)."""
    hidden = model.vision_model(pixel_values=pixels).last_hidden_state
    return model.visual_projection(model.vision_model.post_layernorm(hidden[:, 1:]))



# ---------------------------------------------------------------------------------------------------- evaluation
def exact_set_accuracy(model, tokenizer, world, data, processor, words, max_length):
    """Caption retrieval over every label set of 1-3 classes, captions 'a photo of A and B' with ``words``."""
    sets = [s for k in (1, 2, 3) for s in itertools.combinations(range(len(world.class_names)), k)]
    texts = []
    for s in sets:
        names = [words[c] for c in s]
        texts.append("a photo of " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]))
    ids, attn = tokenize(tokenizer, texts, max_length)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    correct = 0
    with torch.no_grad():
        tf = F.normalize(text_features(model, ids, attn), dim=-1)
        for start in range(0, len(data["labels"]), 100):
            img = torch.from_numpy(data["images"][start:start + 100]).permute(0, 3, 1, 2).float() / 255.0
            f = F.normalize(patch_features(model, (img - mean) / std).mean(1), dim=-1)
            pred = (f @ tf.t()).argmax(1).tolist()
            correct += sum(sets[p] == tuple(t) for p, t in zip(pred, data["labels"][start:start + 100]))
    return correct / len(data["labels"])


def cam_eval(clip, tokenizer, processor, world, data, class_words, refine=False):
    """CAM mIoU (9 labels, background included) with ground-truth labels; power {1, 2} and threshold sweeps."""
    from pole_hf import PoleImageProcessor, PolePromptModel, image_cams
    from pole_hf.evaluation import ThresholdSweep

    pole = PolePromptModel.from_clip(clip, class_names=world.class_names, class_words=class_words,
                                     background_words=world.background_kinds, tokenizer=tokenizer).eval()
    processor = PoleImageProcessor(image_mean=processor.image_mean, image_std=processor.image_std,
                                   patch_size=clip.config.vision_config.patch_size)
    num_labels = len(world.class_names) + 1
    power = ThresholdSweep(num_labels, (1.0, 2.0), mode="power")
    thresholds = [round(t, 2) for t in np.arange(0.1, 0.91, 0.05)]
    thresh = ThresholdSweep(num_labels, thresholds, mode="threshold")
    for image, mask, labels in zip(data["images"], data["masks"], data["labels"]):
        out = image_cams(pole, processor, Image.fromarray(image), list(labels), refine=refine)
        cams = out.cams.numpy()
        ids = [c + 1 for c in labels]
        power.update(cams, ids, mask)
        thresh.update(cams, ids, mask)
    results = {}
    for name, sweep in (("power", power), ("threshold", thresh)):
        value, miou = sweep.best()
        matrix = sweep.matrices[sweep.thresholds.index(value)]
        results[name] = {"value": value, "miou": float(miou), "iou": [float(x) for x in matrix.iou()]}
    return results


def evaluate(model_dir, world, data, max_length, out_json=None):
    clip = CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir)
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    official = list(world.class_names)
    frequent = [world.frequent_word(c) for c in world.class_names]
    report = {"num_images": len(data["labels"])}
    report["acc_official"] = exact_set_accuracy(clip, tokenizer, world, data, processor, official, max_length)
    report["acc_frequent"] = exact_set_accuracy(clip, tokenizer, world, data, processor, frequent, max_length)
    report["cam_official"] = cam_eval(clip, tokenizer, processor, world, data, official)
    report["cam_frequent"] = cam_eval(clip, tokenizer, processor, world, data, frequent)
    names = ["background"] + official
    lines = [f"held-out images: {report['num_images']}",
             f"zero-shot exact-set accuracy (retrieval over 92 label sets): official names "
             f"{100 * report['acc_official']:.1f}%, frequent words {100 * report['acc_frequent']:.1f}%"]
    for rule in ("power", "threshold"):
        o, f = report["cam_official"][rule], report["cam_frequent"][rule]
        lines.append(f"\nCAM mIoU, best background {rule}: official {100 * o['miou']:.1f}% (at {o['value']}), "
                     f"frequent {100 * f['miou']:.1f}% (at {f['value']}), gap {100 * (f['miou'] - o['miou']):+.1f}")
        lines.append("| class | official word | IoU | frequent word | IoU | gap |")
        lines.append("|---|---|---:|---|---:|---:|")
        for k, name in enumerate(names):
            ow = "-" if k == 0 else official[k - 1]
            fw = "-" if k == 0 else frequent[k - 1]
            lines.append(f"| {name} | {ow} | {100 * o['iou'][k]:.1f} | {fw} | {100 * f['iou'][k]:.1f} | "
                         f"{100 * (f['iou'][k] - o['iou'][k]):+.1f} |")
    table = "\n".join(lines)
    print(table, flush=True)
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report, table


def roundtrip_check(reference: CLIPModel, model_dir, world, data, num_images=20):
    """Max |CAM difference| between the in-memory fp32 model and the saved (fp16) folder loaded back in fp32."""
    from pole_hf import PoleImageProcessor, PolePromptModel, image_cams

    tokenizer = CLIPTokenizer.from_pretrained(model_dir)
    base = CLIPImageProcessor.from_pretrained(model_dir)
    processor = PoleImageProcessor(image_mean=base.image_mean, image_std=base.image_std,
                                   patch_size=reference.config.vision_config.patch_size)
    loaded = CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert loaded.dtype == torch.float32, loaded.dtype
    # (from_clip takes base_model_name_or_path only for a model without name_or_path: it raises a duplicate-keyword
    # TypeError otherwise, so it is given for the in-memory reference only)
    models = [PolePromptModel.from_clip(m, class_names=world.class_names, background_words=world.background_kinds,
                                        tokenizer=tokenizer, **extra).eval()
              for m, extra in ((reference.eval(), {"base_model_name_or_path": model_dir}), (loaded, {}))]
    worst = 0.0
    for image, labels in zip(data["images"][:num_images], data["labels"][:num_images]):
        a, b = (image_cams(m, processor, Image.fromarray(image), list(labels)).cams for m in models)
        worst = max(worst, float((a - b).abs().max()))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a CLIP folder (e.g. src/pole_hf/assets/tiny-clip)")
    parser.add_argument("--eval_images", type=int, default=300)
    parser.add_argument("--eval_split", default="test", help="held-out split name (disjoint from 'train')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--out_json", default=None, help="where to write the report as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = SyntheticWorld()
    data = make_data(args.eval_images, args.seed, args.image_size, args.eval_split, world)
    evaluate(args.model_dir, world, data, args.max_length, args.out_json)


if __name__ == "__main__":
    main()
