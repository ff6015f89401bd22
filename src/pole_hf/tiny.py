"""Tiny CLIPs built offline: a CLIP-format BPE tokenizer learned from a word list, and small random CLIP models.

Nothing here downloads anything. The tokenizer files are the same ``vocab.json``/``merges.txt`` format as OpenAI's
CLIP (byte-level symbols, ``</w>`` marks a word's end), so ``CLIPTokenizer`` loads them like a real checkpoint's.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable

from .vocab import (
    CLIP_ES_BACKGROUND_WORDS,
    COCO_CLASSES,
    VOC_CLASSES,
    VOC_PROMPT_WORDS,
    VOC_SYNONYMS,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

BASE_WORDS: tuple[str, ...] = tuple(
    "a photo of an the and with on in clean origami picture image itself this there is are two three".split()
)
"""Template words every tiny tokenizer knows as whole tokens."""


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as GPT-2/CLIP byte-level BPE does."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def default_words() -> list[str]:
    """Words a tiny tokenizer should know: template words, VOC/COCO classes, POLE synonyms, background words."""
    words: list[str] = list(BASE_WORDS)
    for phrase in (*VOC_CLASSES, *COCO_CLASSES, *CLIP_ES_BACKGROUND_WORDS, *VOC_PROMPT_WORDS.values()):
        words.extend(phrase.split())
    for candidates in VOC_SYNONYMS.values():
        for phrase in candidates:
            words.extend(phrase.split())
    return words


def train_clip_bpe(words: Iterable[str], num_merges: int = 600) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-format byte-level BPE from a list of words (each occurrence counts once).

    Args:
        words: lower-case words; repeated words weigh more.
        num_merges: the most merges to learn; learning stops earlier when every word is one token.

    Returns:
        ``(vocab, merges)``: ``vocab`` maps tokens to ids (256 bytes, 256 word-final bytes, merges, then
        ``<|startoftext|>`` and ``<|endoftext|>``, as in OpenAI's CLIP), ``merges`` the learned pairs in order.
    """
    byte_chars = bytes_to_unicode()
    counts = Counter(w.lower() for w in words if w.strip())
    splits: dict[tuple[str, ...], int] = {}
    for word, n in counts.items():
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        splits[tuple(symbols)] = splits.get(tuple(symbols), 0) + n
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, n in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in splits.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        splits = merged
    base = list(byte_chars.values())
    tokens = base + [c + "</w>" for c in base] + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_tokenizer(save_dir: str, vocab: dict[str, int], merges: list[tuple[str, str]],
                         model_max_length: int = 77):
    """Save a ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt``, tokenizer config) from a vocab and merges.

    Returns:
        the loaded ``CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(save_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def save_clip_tokenizer(save_dir: str, words: Iterable[str] | None = None, num_merges: int = 600,
                        model_max_length: int = 77):
    """Train a tiny CLIP BPE on ``words`` (default: :func:`default_words`) and save a ``CLIPTokenizer`` folder.

    Returns:
        the loaded ``CLIPTokenizer``.
    """
    vocab, merges = train_clip_bpe(default_words() if words is None else words, num_merges)
    return write_clip_tokenizer(save_dir, vocab, merges, model_max_length)


OPENAI_CLIP_NUM_MERGES = 49152 - 256 - 2
"""Merges OpenAI's CLIP keeps from its BPE file (vocabulary 49408 = 2 x 256 bytes + merges + 2 special tokens)."""


def openai_clip_bpe(bpe_file: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of OpenAI CLIP's tokenizer from its ``bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI).

    The file ships with OpenAI's ``clip`` package and inside the ``open_clip_torch`` wheel (``open_clip/``). Ids are
    assigned as OpenAI's ``SimpleTokenizer`` does: bytes, word-final bytes, merges, ``<|startoftext|>``,
    ``<|endoftext|>`` (49406, 49407).
    """
    import gzip

    with gzip.open(bpe_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1: OPENAI_CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != OPENAI_CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_file} is not OpenAI CLIP's BPE file: expected {OPENAI_CLIP_NUM_MERGES} merge lines")
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def save_openai_clip_tokenizer(bpe_file: str, save_dir: str):
    """Write OpenAI CLIP's tokenizer as a ``CLIPTokenizer`` folder from its BPE file (see :func:`openai_clip_bpe`).

    Returns:
        the loaded ``CLIPTokenizer`` (the same ids as ``openai/clip-vit-base-patch16``'s tokenizer).
    """
    vocab, merges = openai_clip_bpe(bpe_file)
    return write_clip_tokenizer(save_dir, vocab, merges, model_max_length=77)


def tiny_clip_config(vocab_size: int, bos_token_id: int, eos_token_id: int, *, image_size: int = 32,
                     patch_size: int = 8, vision_width: int = 32, text_width: int = 32, layers: int = 2,
                     heads: int = 2, projection_dim: int = 32, max_position_embeddings: int = 24):
    """A small ``CLIPConfig`` whose special token ids match the tokenizer (CLIP pools at the first EOS)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=4 * text_width,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_position_embeddings,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
                  intermediate_size=4 * vision_width, num_hidden_layers=layers, num_attention_heads=heads)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_tiny_clip(save_dir: str | None = None, *, seed: int = 0, words: Iterable[str] | None = None,
                    num_merges: int = 600, **config_kwargs):
    """Build a random tiny ``CLIPModel`` with a real CLIP tokenizer and image processor, fully offline.

    Args:
        save_dir: when given, the model, tokenizer and image processor are saved there as an ordinary HF folder.
        seed: torch seed for the random weights.
        words: the tokenizer's training words (default: :func:`default_words`).
        num_merges: BPE merges to learn.
        **config_kwargs: passed to :func:`tiny_clip_config` (``image_size``, ``patch_size``, widths, ``layers``...).

    Returns:
        ``(model, tokenizer, image_processor)``.
    """
    import tempfile

    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    tok_dir = save_dir or tempfile.mkdtemp(prefix="pole_tiny_tok_")
    tokenizer = save_clip_tokenizer(tok_dir, words, num_merges,
                                    model_max_length=config_kwargs.get("max_position_embeddings", 24))
    config = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, **config_kwargs)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    size = config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if save_dir is not None:
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, tokenizer, processor


def vit_b16_config(vocab_size: int = 49408):
    """The ``CLIPConfig`` of OpenAI's ViT-B/16 CLIP (for random-init size and speed checks; no weights)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512, logit_scale_init_value=4.6052)
