#!/usr/bin/env python
"""How far a prompt is from its sentence: per-class lengths (default) vs a fixed `class_token_length=1`.

    python benchmarks/prompt_fidelity.py

For the multi-token words of CLIP-ES's and CLIMS/POLE's VOC settings it prints the cosine of the prompt's text
feature to `CLIPModel.get_text_features` of the sentence (ViT-B/16 text size, random weights, the real OpenAI BPE
vocabulary from tests/data), the prompt file sizes, and on the bundled tiny CLIP the cosines and the correlation of
the CAMs of the fixed-length prompts with the exact prompts' CAMs on synthetic images.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel

import pole_hf
from pole_hf import PoleImageProcessor, PolePromptModel
from pole_hf.data import load_synthetic
from pole_hf.tiny import save_openai_clip_tokenizer, vit_b16_config
from pole_hf.vocab import PROMPT_PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE_FILE = os.path.join(ROOT, "tests", "data", "bpe_simple_vocab_16e6.txt.gz")
OPTIONS = {"per-class (default)": {}, "class_token_length=1": {"class_token_length": 1},
           "learnable_tokens='first'": {"learnable_tokens": "first"}}
TINY_WORDS = {"zebra": "stripes", "fence": "person with clothes,people,human", "chessboard": "potted plant",
              "target": "dining table"}


def cosines(model, clip, tokenizer, sentences):
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = F.normalize(clip.get_text_features(**inputs).pooler_output, dim=-1)
        return (model.get_text_features()[: len(sentences)] * reference).sum(-1)


def vit_b16_report():
    tokenizer = save_openai_clip_tokenizer(BPE_FILE, tempfile.mkdtemp())
    config = vit_b16_config()
    config.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32))  # only the text tower matters here
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    print("## ViT-B/16 text size (random weights), real vocabulary\n")
    print("| preset | word | tokens | " + " | ".join(f"cos, {name}" for name in OPTIONS) + " |")
    print("|---|---|---|" + "---|" * len(OPTIONS))
    sizes = []
    for name, preset in PROMPT_PRESETS.items():
        models = {label: PolePromptModel.from_clip(clip, tokenizer=tokenizer, preset=name, **options)
                  for label, options in OPTIONS.items()}
        words = [preset.class_words[c] for c in preset.class_names]
        sentences = [preset.template.format(w) for w in words]
        cos = {label: cosines(m, clip, tokenizer, sentences) for label, m in models.items()}
        for index, word in enumerate(words):
            count = len(tokenizer(word, add_special_tokens=False).input_ids)
            if count > 1:
                print(f"| {name} | {word} | {count} | " + " | ".join(f"{cos[label][index]:.4f}" for label in OPTIONS)
                      + " |")
        for label, model in models.items():
            folder = tempfile.mkdtemp()
            model.save_pretrained(folder)
            size = os.path.getsize(os.path.join(folder, "model.safetensors")) / 1024
            sizes.append(f"| {name} | {label} | {tuple(model.prompt_learner.class_tokens.shape)} | {size:.1f} KB |")
    print("\n| preset | class tokens | `class_tokens` shape | model.safetensors |\n|---|---|---|---|")
    print("\n".join(sizes))


def tiny_clip_report(num_images: int = 40):
    clip = CLIPModel.from_pretrained(pole_hf.TINY_CLIP).eval()
    tokenizer = AutoTokenizer.from_pretrained(pole_hf.TINY_CLIP)
    names = list(TINY_WORDS)
    common = dict(class_names=names, class_words=TINY_WORDS, background_words=["grass", "sky", "water", "sand"])
    exact = PolePromptModel.from_clip(pole_hf.TINY_CLIP, **common)
    fixed = PolePromptModel.from_clip(pole_hf.TINY_CLIP, class_token_length=1, **common)
    sentences = [exact.config.template.format(TINY_WORDS[n]) for n in names]
    cos_exact, cos_fixed = cosines(exact, clip, tokenizer, sentences), cosines(fixed, clip, tokenizer, sentences)
    processor = PoleImageProcessor.for_model(exact)
    correlations = {n: [] for n in names}
    for example in load_synthetic(num_images, seed=3, image_size=64):
        pixels = processor.pixel_values(example["image"].convert("RGB"), (64, 64))
        maps = [model.get_cams(pixels, list(range(len(names)))).cams[0] for model in (exact, fixed)]
        for index, name in enumerate(names):
            a, b = (m[index].flatten().numpy() for m in maps)
            if a.std() > 0 and b.std() > 0:
                correlations[name].append(np.corrcoef(a, b)[0, 1])
    print(f"\n## Bundled tiny CLIP ({num_images} synthetic images, all four classes as CAM targets)\n")
    print("| word | tokens | cos, per-class | cos, class_token_length=1 | CAM r (length 1 vs exact), mean / min |")
    print("|---|---|---|---|---|")
    for index, name in enumerate(names):
        word = TINY_WORDS[name]
        count = len(tokenizer(word, add_special_tokens=False).input_ids)
        r = correlations[name]
        print(f"| {word} | {count} | {cos_exact[index]:.4f} | {cos_fixed[index]:.4f} | {np.mean(r):.3f} / "
              f"{np.min(r):.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    vit_b16_report()
    tiny_clip_report()
