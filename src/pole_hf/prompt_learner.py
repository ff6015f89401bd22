"""The prompt learner: learnable class-token embeddings (and optional CoOp context) spliced into a fixed template."""

from __future__ import annotations

import torch
from torch import nn

from .configuration_pole import LEARNABLE_TOKENS


def tokenize_template(tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids of the template before and after its ``{}``: ``([BOS, ...prefix], [...suffix, EOS])``."""
    prefix_text, suffix_text = template.split("{}")
    prefix = tokenizer(prefix_text.strip(), add_special_tokens=False).input_ids if prefix_text.strip() else []
    suffix = tokenizer(suffix_text.strip(), add_special_tokens=False).input_ids if suffix_text.strip() else []
    return [tokenizer.bos_token_id, *prefix], [*suffix, tokenizer.eos_token_id]


def tokenize_word(tokenizer, word: str) -> list[int]:
    """Token ids of a class word, without special tokens; raises when the word has no tokens."""
    ids = tokenizer(word.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"class word {word!r} has no tokens: give a non-empty word")
    return ids


def init_class_vectors(token_embeds: torch.Tensor, length: int) -> tuple[torch.Tensor, int]:
    """Initial class-token vectors from a word's token embeddings ``[n, D]`` for ``length`` slots.

    A word with at most ``length`` tokens keeps its own embeddings (the prompt starts as the plain sentence); a
    longer word is split into ``length`` contiguous groups, each slot the mean of its group.

    Returns:
        ``(vectors [length, D] (unused slots zero), used_slots)``.
    """
    n, dim = token_embeds.shape
    out = token_embeds.new_zeros(length, dim)
    if n <= length:
        out[:n] = token_embeds
        return out, n
    for slot, group in enumerate(torch.tensor_split(token_embeds, length)):
        out[slot] = group.mean(0)
    return out, length


class PoleAdapter(nn.Module):
    """POLE's learnable-ratio adapter: ``f' = r * A(f) + (1 - r) * f`` with ``A`` = Linear-ReLU-Linear-ReLU."""

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False),
                                nn.ReLU())
        self.ratio = nn.Parameter(torch.full((dim,), float(ratio)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        ratio = self.ratio.to(features.dtype)
        return ratio * self.fc(features.to(self.ratio.dtype)).to(features.dtype) + (1 - ratio) * features


class PolePromptLearner(nn.Module):
    """Owns the learnable prompt tensors and the token ids of the fixed prompt parts.

    A class prompt is ``[BOS, prefix (or learned context), learned class vectors, fixed word tail, suffix, EOS]``.

    Args:
        num_classes: number of foreground classes.
        class_token_length: `None` (every token of a class word is one learnable vector, a per-class length) or
            a fixed number of vectors per class (a longer word is averaged into that many contiguous groups).
        width: the text model's hidden size.
        num_background: number of background prompts.
        learn_context: also learn the template words before the class word (CoOp-style context).
        learnable_tokens: `"all"` (every class vector is learnable) or `"first"` (POLE's DeFo-style variant: one
            learnable vector per class, the word's first token; its remaining tokens stay fixed token ids).

    Tensors (all saved in the prompts file):
        ``class_tokens`` [C, L, D] learnable (L: the longest class's vectors, or `class_token_length`);
        ``context`` [P-1, D] learnable when ``learn_context``; ``prefix_ids`` [P], ``suffix_ids`` [S],
        ``class_token_lengths`` [C], ``background_ids`` [B, Tb] and ``background_lengths`` [B]; with
        ``learnable_tokens="first"`` also ``class_tail_ids`` [C, Tt] and ``class_tail_lengths`` [C]: token ids, so a
        prompts file rebuilds its prompts without a tokenizer.
    """

    def __init__(self, num_classes: int, class_token_length: int | None, width: int, num_background: int,
                 learn_context: bool = False, learnable_tokens: str = "all"):
        super().__init__()
        if learnable_tokens not in LEARNABLE_TOKENS:
            raise ValueError(f"learnable_tokens={learnable_tokens!r} must be one of {LEARNABLE_TOKENS}")
        self.fixed_length = class_token_length
        self.learnable_tokens = learnable_tokens
        slots = 1 if learnable_tokens == "first" else (class_token_length or 1)
        self.class_tokens = nn.Parameter(torch.zeros(num_classes, slots, width))
        self.register_buffer("class_token_lengths", torch.ones(num_classes, dtype=torch.long))
        self.register_buffer("prefix_ids", torch.zeros(1, dtype=torch.long))
        self.register_buffer("suffix_ids", torch.zeros(1, dtype=torch.long))
        self.register_buffer("background_ids", torch.zeros(num_background, 2, dtype=torch.long))
        self.register_buffer("background_lengths", torch.full((num_background,), 2, dtype=torch.long))
        if learnable_tokens == "first":
            self.register_buffer("class_tail_ids", torch.zeros(num_classes, 0, dtype=torch.long))
            self.register_buffer("class_tail_lengths", torch.zeros(num_classes, dtype=torch.long))
        else:
            self.class_tail_ids = self.class_tail_lengths = None
        self.learn_context = learn_context
        self.context = nn.Parameter(torch.zeros(0, width)) if learn_context else None

    @torch.no_grad()
    def initialize(self, tokenizer, token_embedding: nn.Embedding, template: str, class_words: list[str],
                   background_words: list[str], max_length: int) -> None:
        """Tokenise the template, class words and background prompts; initialise the vectors from embeddings."""
        prefix, suffix = tokenize_template(tokenizer, template)
        device = self.class_tokens.device
        self.prefix_ids = torch.tensor(prefix, dtype=torch.long, device=device)
        self.suffix_ids = torch.tensor(suffix, dtype=torch.long, device=device)
        if self.fixed_length is None and self.learnable_tokens == "all":  # room for the longest word
            self.resize_class_tokens(max(len(tokenize_word(tokenizer, w)) for w in class_words))
        for index, word in enumerate(class_words):
            self.set_class_word(index, tokenizer, token_embedding, word, max_length)
        if self.learn_context:
            ctx = token_embedding(self.prefix_ids[1:]).float()
            self.context = nn.Parameter(ctx.clone(), requires_grad=self.class_tokens.requires_grad)
        rows = [tokenizer(template.format(w)).input_ids for w in background_words]
        for row, word in zip(rows, background_words):
            if len(row) > max_length:
                raise ValueError(f"background prompt for {word!r} has {len(row)} tokens, more than {max_length}")
        self.background_ids, self.background_lengths = pad_id_rows(rows, tokenizer.eos_token_id, device)

    @torch.no_grad()
    def resize_class_tokens(self, slots: int) -> None:
        """Give `class_tokens` room for `slots` vectors per class (a new parameter: build optimizers after this)."""
        old = self.class_tokens
        if old.shape[1] == slots:
            return
        new = old.new_zeros(old.shape[0], slots, old.shape[2])
        keep = min(slots, old.shape[1])
        new[:, :keep] = old[:, :keep]
        self.class_tokens = nn.Parameter(new, requires_grad=old.requires_grad)

    @torch.no_grad()
    def set_class_word(self, index: int, tokenizer, token_embedding: nn.Embedding, word: str, max_length: int):
        """Re-initialise class ``index``'s vectors (and, with ``learnable_tokens="first"``, its fixed tail) from
        ``word``'s tokens. With a per-class length a word longer than `class_tokens` has room for grows it."""
        ids = tokenize_word(tokenizer, word)
        kept = len(ids) if self.fixed_length is None else min(len(ids), self.fixed_length)
        total = len(self.prefix_ids) + kept + len(self.suffix_ids)
        if total > max_length:
            raise ValueError(f"prompt for class word {word!r} has {total} tokens, more than the text model's "
                             f"{max_length}: use a shorter word or template")
        learned, tail = (ids[:1], ids[1:]) if self.learnable_tokens == "first" else (ids, [])
        if self.fixed_length is None and self.learnable_tokens == "all" and len(ids) > self.class_tokens.shape[1]:
            self.resize_class_tokens(len(ids))
        embeds = token_embedding(torch.tensor(learned, device=token_embedding.weight.device))
        vectors, used = init_class_vectors(embeds.float(), self.class_tokens.shape[1])
        self.class_tokens[index].copy_(vectors.to(self.class_tokens.dtype))
        self.class_token_lengths[index] = used
        if self.class_tail_ids is not None:
            self.set_class_tail(index, tail)

    def set_class_tail(self, index: int, tail: list[int]) -> None:
        """Set class ``index``'s fixed word tail (the word's tokens after its learnable first one)."""
        rows = [self.class_tail_ids[i, : int(n)].tolist() for i, n in enumerate(self.class_tail_lengths)]
        rows[index] = list(tail)
        self.class_tail_ids, self.class_tail_lengths = pad_id_rows(rows, 0, self.class_tail_ids.device)

    def class_prompt_embeddings(self, token_embedding: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded class prompts ``[C, T, D]`` (before position embeddings) and each prompt's EOS position ``[C]``."""
        dtype = token_embedding.weight.dtype
        prefix = token_embedding(self.prefix_ids)
        if self.context is not None:
            prefix = torch.cat([prefix[:1], self.context.to(dtype)], dim=0)
        suffix = token_embedding(self.suffix_ids)
        learned = self.class_token_lengths.tolist()
        tails = [0] * len(learned) if self.class_tail_ids is None else self.class_tail_lengths.tolist()
        tail_embeds = None if self.class_tail_ids is None else token_embedding(self.class_tail_ids)
        words = [n + t for n, t in zip(learned, tails)]
        total = len(prefix) + max(words) + len(suffix)
        rows = []
        for index, (used, tail) in enumerate(zip(learned, tails)):
            parts = [prefix, self.class_tokens[index, :used].to(dtype)]
            if tail:
                parts.append(tail_embeds[index, :tail])
            parts += [suffix, prefix.new_zeros(total - len(prefix) - used - tail - len(suffix), prefix.shape[-1])]
            rows.append(torch.cat(parts, dim=0))
        eos = torch.tensor(words, device=prefix.device) + len(prefix) + len(suffix) - 1
        return torch.stack(rows), eos


def pad_id_rows(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as a padded ``[N, max_len]`` long tensor and their lengths ``[N]``."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
