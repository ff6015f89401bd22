#!/usr/bin/env python
"""Train the tiny CLIP bundled with pole_hf on the synthetic world, so that CLIP-ES GradCAMs localise its objects.

The model is an ordinary ``CLIPModel`` (ViT patch 8, 4 blocks) with a CLIP-format BPE tokenizer learned from the
world's words (plus ``pole_hf.tiny.default_words()`` so VOC/COCO prompts tokenize). It is trained for the CAM that
pole_hf computes: the image feature is the projected mean of the post-layernormed patch tokens (``patch_mean``),
and the CAM is GradCAM on the last block's ``layer_norm1`` output of the softmax over [classes + background words].

Losses (all on features that inference uses):

* ``clip``: caption-image contrastive loss on the patch-mean feature, with every image of the same label set a
  positive (soft targets), both directions. Captions are the world's own (skewed words: "stripes" 70%, "zebra" 1%).
* ``image``: softmax over word prompts ``"a photo of a {word}."`` (every class word and background word) of the
  patch-mean feature; target = the words the caption used for the image's classes and the image's background word,
  weighted by their pixel share. The other synonyms of present classes stay in the softmax as negatives
  (``--synonym_negatives 1``), so the model learns how rarely a class is called by its rare name; that is what makes
  the official names' CAMs poor (see examples/README.md).
* ``patch``: each patch token (projected, post-layernormed) is classified against learnable per-class and
  per-background prototypes (``--patch_targets prototypes``, a training-only head) or against the word prompts
  (``words``); targets are the mask's pixel shares in that patch. This is an auxiliary patch-level signal derived
  from the synthetic masks; it keeps patch tokens class-specific so GradCAM localises.

Usage::

    python examples/train_tiny_clip.py --output_dir src/pole_hf/assets/tiny-clip --steps 3000

The script evaluates on held-out images (split "test"): zero-shot exact-set accuracy (caption retrieval over all
label sets of 1-3 classes) and CAM mIoU (background included) with the official class names and with the frequent
caption words, through ``PolePromptModel.from_clip`` and ``PolePromptModel.get_cams``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from evaluate_tiny_clip import evaluate, make_data, patch_features, roundtrip_check, text_features, tokenize
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from pole_hf.data.synthetic import (
    BACKGROUND_PHRASES,
    CAPTION_TEMPLATES,
    SyntheticWorld,
)
from pole_hf.tiny import BASE_WORDS, default_words, save_clip_tokenizer

TEMPLATE = "a photo of a {}."  # PoleConfig's default template: word prompts are trained exactly as inference uses them


# ---------------------------------------------------------------------------------------------------- data
def tokenizer_words(world: SyntheticWorld) -> list[str]:
    """World words (repeated so BPE makes each one token) + templates + background phrases + default words."""
    words = []
    for class_words in world.candidates.values():
        words.extend(class_words)
    phrases = list(CAPTION_TEMPLATES) + list(BACKGROUND_PHRASES.values()) + [TEMPLATE, "and"]
    for phrase in phrases:
        words.extend(phrase.replace("{}", " ").replace(".", " ").split())
    words.extend(world.background_kinds)
    words = words * 50 + list(BASE_WORDS) * 10 + default_words()
    return words


def build_model(vocab_size: int, bos: int, eos: int, args) -> CLIPModel:
    text = dict(vocab_size=vocab_size, hidden_size=args.text_width, intermediate_size=4 * args.text_width,
                num_hidden_layers=args.text_layers, num_attention_heads=4, max_position_embeddings=args.max_length,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = dict(image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.width,
                  intermediate_size=4 * args.width, num_hidden_layers=args.layers, num_attention_heads=4)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim)
    return CLIPModel(config)


# ---------------------------------------------------------------------------------------------------- training
def train(args, world, data, tokenizer, model, mean, std):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    class_words = list(world.candidates.values())
    word_list = [w for ws in class_words for w in ws] + world.background_kinds
    word_index = {w: i for i, w in enumerate(word_list)}
    word_class = {w: c for c, ws in enumerate(class_words) for w in ws}
    num_words = len(word_list)
    # per-class mask over words: the synonyms of class c
    synonyms = torch.zeros(len(class_words), num_words, dtype=torch.bool)
    for c, ws in enumerate(class_words):
        for w in ws:
            synonyms[c, word_index[w]] = True
    word_ids, word_attn = tokenize(tokenizer, [TEMPLATE.format(w) for w in word_list], args.max_length)
    word_len = int(word_attn.sum(1).max())
    word_ids, word_attn = word_ids[:, :word_len], word_attn[:, :word_len]

    n = len(data["captions"])
    cap_ids, cap_attn = tokenize(tokenizer, data["captions"], args.max_length)
    set_ids = {s: i for i, s in enumerate(sorted(set(data["labels"])))}
    label_set = torch.tensor([set_ids[s] for s in data["labels"]])
    # caption word of each present class -> word index; background word index
    used_word = torch.full((n, len(class_words)), -1, dtype=torch.long)
    for i, caption in enumerate(data["captions"]):
        for token in caption.replace(",", " ").split():
            if token in word_class:
                used_word[i, word_class[token]] = word_index[token]
    bg_word = torch.tensor([word_index[b] for b in data["backgrounds"]])
    images = torch.from_numpy(data["images"])  # uint8 [n, H, W, 3]
    masks = torch.from_numpy(data["masks"]).long()
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    p = args.patch_size
    grid = args.image_size // p

    # --patch_targets prototypes: the patch loss scores patch tokens against one learnable prototype per class and per
    # background kind (a training-only head, not saved), so the text tower learns words only from image-level losses
    num_slots = len(class_words) + len(world.background_kinds)
    prototypes = torch.nn.Parameter(0.02 * torch.randn(num_slots, model.config.projection_dim))
    slot_lookup = torch.cat([torch.tensor([len(class_words) + world.background_kinds.index(b) for b in data["backgrounds"]])[:, None],
                             torch.arange(len(class_words)).expand(n, -1)], dim=1)  # [n, 9]

    model.train()
    decay = [q for name, q in model.named_parameters() if q.ndim >= 2 and "embedding" not in name]
    no_decay = [q for name, q in model.named_parameters() if not (q.ndim >= 2 and "embedding" not in name)]
    if args.patch_targets == "prototypes":
        no_decay = no_decay + [prototypes]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))
    budget = args.max_minutes * 60 if args.max_minutes else None

    def lr_at(progress):  # one-cycle: 10% linear warm-up, cosine decay to 1% of the peak
        if progress < 0.1:
            return args.lr * (0.04 + 0.96 * progress / 0.1)
        return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - 0.1) / 0.9))))

    start = time.time()
    log = []
    bar = tqdm(range(args.steps), desc="train", mininterval=10)
    next_checkpoint = args.checkpoint_minutes * 60 if args.checkpoint_minutes else None
    # thread auto-tuning (--threads 0): on a shared CPU two OpenMP threads can be 10x slower than one when another
    # process holds a core; every 100 steps the other setting is tried for 5 steps and the faster one kept
    auto = args.threads == 0
    threads, trial, timing = 2, None, {}
    if auto:
        torch.set_num_threads(threads)
    step_start = time.time()
    for step in bar:
        if auto and step > 0:
            took = time.time() - step_start
            timing.setdefault(torch.get_num_threads(), []).append(took)
            if trial is None and step % 100 == 0:
                trial, timing = step, {}
                torch.set_num_threads(3 - threads)
            elif trial is not None and step == trial + 5:
                torch.set_num_threads(threads)
            elif trial is not None and step == trial + 10:
                mean_time = {t: float(np.median(v[1:])) for t, v in timing.items() if len(v) > 1}
                if len(mean_time) == 2:
                    threads = min(mean_time, key=mean_time.get)
                torch.set_num_threads(threads)
                trial = None
        step_start = time.time()
        elapsed = time.time() - start
        progress = max(step / args.steps, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            print(f"time budget of {args.max_minutes} min reached at step {step}", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress)
        if next_checkpoint and elapsed > next_checkpoint and args.checkpoint_dir:
            model.half().save_pretrained(args.checkpoint_dir)
            model.float()
            next_checkpoint += args.checkpoint_minutes * 60
        idx = torch.from_numpy(rng.choice(n, size=args.batch_size, replace=False))
        img = images[idx].permute(0, 3, 1, 2).float() / 255.0
        msk = masks[idx]
        # label-preserving flips (stripes stay horizontal/vertical; the diagonal class has both diagonals)
        if rng.random() < 0.5:
            img, msk = img.flip(-1), msk.flip(-1)
        if rng.random() < 0.5:
            img, msk = img.flip(-2), msk.flip(-2)
        pixels = (img - mean_t) / std_t
        b = len(idx)

        # word targets per pixel class: 0 -> background word, c+1 -> caption word of class c
        lookup = torch.cat([bg_word[idx, None], used_word[idx]], dim=1)  # [b, 9]
        share = F.one_hot(msk, len(class_words) + 1).float()  # [b, H, W, 9]
        share = share.view(b, grid, p, grid, p, -1).mean(dim=(2, 4)).view(b, grid * grid, -1)  # [b, N, 9]
        safe = lookup.clamp_min(0)
        patch_target = torch.zeros(b, grid * grid, num_words)
        patch_target.scatter_add_(2, safe[:, None, :].expand(-1, grid * grid, -1), share)
        # leave the other synonyms of present classes out of the softmax
        present = (lookup[:, 1:] >= 0)  # [b, C]
        excluded = (present.float() @ synonyms.float()) > 0  # [b, W]
        used = (F.one_hot(safe[:, 1:], num_words).bool() & present[:, :, None]).any(1)
        excluded &= ~used
        if args.synonym_negatives:  # plain softmax over all words: p(word | patch) learns the caption frequencies
            excluded &= False
        if args.word_negatives == "batch":  # as in CLIP's in-batch contrast, a class word takes part in a step only
            in_batch = used.any(0)          # when one of the batch's captions uses it: rare words are seen rarely
            in_batch[len(word_list) - len(world.background_kinds):] = True
            excluded = excluded | ~in_batch[None, :]

        feats = patch_features(model, pixels)  # [b, N, P]
        image_feat = F.normalize(feats.mean(1), dim=-1)
        patch_feat = F.normalize(feats, dim=-1)
        words_feat = F.normalize(text_features(model, word_ids, word_attn), dim=-1)
        cap_len = int(cap_attn[idx].sum(1).max())
        caps_feat = F.normalize(text_features(model, cap_ids[idx, :cap_len], cap_attn[idx, :cap_len]), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)

        neg = torch.finfo(feats.dtype).min / 4
        word_logits = scale * image_feat @ words_feat.t()
        word_logits = word_logits.masked_fill(excluded, neg)
        image_target = patch_target.mean(1)
        loss_image = -(image_target * word_logits.log_softmax(-1)).sum(-1).mean()

        if args.patch_targets == "prototypes":
            slot_target = torch.zeros(b, grid * grid, num_slots)
            slot_target.scatter_add_(2, slot_lookup[idx][:, None, :].expand(-1, grid * grid, -1), share)
            patch_logits = args.patch_scale * patch_feat @ F.normalize(prototypes, dim=-1).t()
            loss_patch = -(slot_target * patch_logits.log_softmax(-1)).sum(-1).mean()
        else:
            patch_logits = args.patch_scale * patch_feat @ words_feat.t()
            patch_logits = patch_logits.masked_fill(excluded[:, None, :], neg)
            loss_patch = -(patch_target * patch_logits.log_softmax(-1)).sum(-1).mean()

        sim = scale * image_feat @ caps_feat.t()
        same = (label_set[idx][:, None] == label_set[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss_clip = 0.5 * (-(target * sim.log_softmax(1)).sum(1).mean() - (target * sim.t().log_softmax(1)).sum(1).mean())

        loss = loss_clip + args.image_weight * loss_image + args.patch_weight * loss_patch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.steps - 1:
            entry = dict(step=step, threads=torch.get_num_threads(), lr=optimizer.param_groups[0]["lr"], loss=loss.item(), clip=loss_clip.item(), image=loss_image.item(),
                         patch=loss_patch.item(), scale=scale.item(), minutes=(time.time() - start) / 60)
            log.append(entry)
            bar.set_postfix({k: round(v, 3) for k, v in entry.items() if k != "step"})
            if step % 500 == 0:
                print(json.dumps(entry), flush=True)
    model.eval()
    log.append({"steps_done": step + 1 if progress < 1.0 else step})
    return log, time.time() - start


# ---------------------------------------------------------------------------------------------------- evaluation
# ---------------------------------------------------------------------------------------------------- main
def folder_size_mb(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def save(model, tokenizer_dir, output_dir, image_size, mean, std, fp16=True):
    os.makedirs(output_dir, exist_ok=True)
    to_save = model.half() if fp16 else model
    to_save.save_pretrained(output_dir)
    model.float()
    # weights are stored in fp16 (half the size), but the config says float32 so that a plain
    # CLIPModel.from_pretrained(dir) (dtype "auto" in transformers 5) computes in fp32 on CPU
    config_path = os.path.join(output_dir, "config.json")
    with open(config_path) as fh:
        config = json.load(fh)
    config["dtype"] = "float32"
    with open(config_path, "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(output_dir, name))
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size},
                                   image_mean=[float(x) for x in mean], image_std=[float(x) for x in std])
    processor.save_pretrained(output_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="tiny-clip")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text_width", type=int, default=128)
    parser.add_argument("--text_layers", type=int, default=4)
    parser.add_argument("--projection_dim", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--num_merges", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patch_weight", type=float, default=1.0)
    parser.add_argument("--image_weight", type=float, default=0.5)
    parser.add_argument("--synonym_negatives", type=int, default=1,
                        help="1: the other synonyms of a present class stay in the word softmax (as negatives), so "
                             "p(word | patch) learns how often captions use each word; 0: leave them out")
    parser.add_argument("--word_negatives", choices=("all", "batch"), default="all",
                        help="words in the image loss's softmax: every class word in every step, or only the words "
                             "the batch's captions use (CLIP-like: a word is trained only in batches that mention it)")
    parser.add_argument("--patch_targets", choices=("words", "prototypes"), default="prototypes",
                        help="what the patch loss scores patch tokens against: the word prompts, or learnable "
                             "per-class/per-background prototypes (the text tower then learns words image-level only)")
    parser.add_argument("--patch_scale", type=float, default=10.0, help="fixed logit scale of the patch loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_images", type=int, default=30000)
    parser.add_argument("--eval_images", type=int, default=300)
    parser.add_argument("--eval_split", default="test", help="held-out split name (disjoint from 'train')")
    parser.add_argument("--threads", type=int, default=2, help="0: choose 1 or 2 by timing, re-checked every 100 steps")
    parser.add_argument("--max_minutes", type=float, default=None,
                        help="stop after this much training time; the lr schedule follows max(step/steps, time/budget)")
    parser.add_argument("--checkpoint_minutes", type=float, default=None)
    parser.add_argument("--checkpoint_dir", default=None)
    parser.add_argument("--log_dir", default=None, help="where to write train_log.json and eval.json")
    parser.add_argument("--eval_only", action="store_true", help="evaluate the model in --output_dir")
    args = parser.parse_args()

    torch.set_num_threads(args.threads or 2)
    torch.set_flush_denormal(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    world = SyntheticWorld()
    test = make_data(args.eval_images, args.seed, args.image_size, args.eval_split, world)
    if args.eval_only:
        evaluate(args.output_dir, world, test, args.max_length,
                 os.path.join(args.log_dir, "eval.json") if args.log_dir else None)
        return

    train_data = make_data(args.num_train_images, args.seed, args.image_size, "train", world)
    pixels = train_data["images"][: min(5000, args.num_train_images)].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pixels.mean(0).round(4).tolist(), pixels.std(0).round(4).tolist()

    import tempfile
    tok_dir = tempfile.mkdtemp(prefix="tinyclip_tok_")
    tokenizer = save_clip_tokenizer(tok_dir, tokenizer_words(world), args.num_merges, model_max_length=args.max_length)
    for w in [w for ws in world.candidates.values() for w in ws] + world.background_kinds:
        pieces = tokenizer.tokenize(w)
        if len(pieces) != 1:
            print(f"note: word {w!r} is {len(pieces)} tokens: {pieces}")
    model = build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, args)
    print(f"vocab {len(tokenizer)}, parameters {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M", flush=True)

    log, seconds = train(args, world, train_data, tokenizer, model, mean, std)
    print(f"training took {seconds / 60:.1f} min for {log[-1]['steps_done']} steps", flush=True)
    import copy
    reference = copy.deepcopy(model).float()  # fp32 weights, before the fp16 save
    save(model, tok_dir, args.output_dir, args.image_size, mean, std)
    print(f"saved {args.output_dir}: {folder_size_mb(args.output_dir):.2f} MB", flush=True)
    diff = roundtrip_check(reference, args.output_dir, world, test)
    print(f"fp16 folder loaded in fp32 vs trained fp32 model: max |CAM difference| over 20 images = {diff:.4f}",
          flush=True)
    del reference
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        with open(os.path.join(args.log_dir, "train_log.json"), "w") as fh:
            json.dump({"args": vars(args), "seconds": seconds, "log": log}, fh)
    evaluate(args.output_dir, world, test, args.max_length,
             os.path.join(args.log_dir, "eval.json") if args.log_dir else None)


if __name__ == "__main__":
    main()
