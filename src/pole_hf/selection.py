"""POLE class-token selection: pick each class's prompt word among synonyms by scoring CAM-masked images with CLIP.

For every image and each of its classes, the image is masked with the class's CAM (``cam * image`` in [0, 1] pixel
space, so the rest turns black), squashed to CLIP's input size and scored by the *base* CLIP against every candidate
word of that class in a fixed sentence (``"A photo of {}."``): ``p = softmax(logit_scale * cos(image, sentences))``
over the class's candidates; the image votes for the argmax. A class's word for the dataset is the word with most
votes, ties broken by the higher mean probability over the class's images, then by candidate order.

Source: POLE (Murugesan et al., WACV 2024), ``rB080/WSS_POLE`` ``sim_test.ipynb`` / ``utils.py``
(``get_similarity``: ``(100 * image @ text.T).softmax(-1)`` over a class's candidate words on its CAM-masked image).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import _clip_internals as internals
from .atomic import atomic_write_text
from .cam_inference import iter_cams
from .data import SyntheticWorld
from .image_processing_pole import PoleImageProcessor
from .images import load_image
from .labels import class_indices
from .objective import masked_images
from .vocab import SELECTION_TEMPLATE, VOC_SYNONYMS

SELECTION_FORMAT = "pole_hf.selection"
SELECTION_VERSION = 1


@dataclass
class WordChoice:
    """One image's vote for one of its classes.

    Args:
        image (`int`): position of the image in the input iterable.
        image_id (`str`, *optional*): the id given with the image, if any.
        class_name (`str`): the class.
        word (`str`): the candidate with the highest probability on the class's masked image.
        probabilities (`dict[str, float]`): softmax probability of every candidate, in candidate order.
    """

    image: int
    image_id: str | None
    class_name: str
    word: str
    probabilities: dict[str, float]


@dataclass
class ClassSummary:
    """Dataset-level result for one class.

    Args:
        votes (`dict[str, int]`): images that chose each candidate (every candidate listed, zeros included).
        mean_probability (`dict[str, float]`): each candidate's probability averaged over the class's images.
        winner (`str`, *optional*): most votes, then higher mean probability, then candidate order; `None` when
            no image has the class.
        images (`int`): number of images that have the class.
    """

    votes: dict[str, int]
    mean_probability: dict[str, float]
    winner: str | None
    images: int


@dataclass
class SelectionResult:
    """Per-image choices of a selection run and their per-class summary.

    Args:
        candidates (`dict[str, list[str]]`): the candidate words scored for each class.
        template (`str`): the sentence the candidates were scored in.
        choices (`list[WordChoice]`): one entry per (image, class) pair, by image position, then class order.
    """

    candidates: dict[str, list[str]]
    template: str = SELECTION_TEMPLATE
    choices: list[WordChoice] = field(default_factory=list)

    def summary(self) -> dict[str, ClassSummary]:
        """Votes, mean probabilities and winner of every candidate class (see [`ClassSummary`])."""
        out = {}
        for name, words in self.candidates.items():
            mine = [c for c in self.choices if c.class_name == name]
            votes = {w: sum(c.word == w for c in mine) for w in words}
            mean = {w: (sum(c.probabilities.get(w, 0.0) for c in mine) / len(mine) if mine else 0.0) for w in words}
            # max() keeps the first of equal keys, so remaining ties go to the earlier candidate
            winner = max(words, key=lambda w: (votes[w], mean[w])) if mine else None
            out[name] = ClassSummary(votes=votes, mean_probability=mean, winner=winner, images=len(mine))
        return out

    @property
    def winners(self) -> dict[str, str]:
        """`{class_name: winning word}` for every class seen in at least one image."""
        return {name: s.winner for name, s in self.summary().items() if s.winner is not None}

    def apply(self, model) -> dict[str, str]:
        """Set the winning words as `model`'s class words (`model.set_class_words`).

        Only classes whose winner differs from their current word change (their class tokens restart from the new
        word's embeddings); the others keep their tokens. Returns the `{class_name: word}` that changed.
        """
        current = dict(zip(model.config.class_names, model.config.class_words))
        changed = {name: word for name, word in self.winners.items() if current.get(name) != word}
        if changed:
            model.set_class_words(changed)
        return changed

    def to_dict(self) -> dict:
        """A JSON-ready dict: format tag, template, candidates, choices, summary and winners."""
        return {
            "format": SELECTION_FORMAT,
            "version": SELECTION_VERSION,
            "template": self.template,
            "candidates": self.candidates,
            "winners": self.winners,
            "summary": {name: asdict(s) for name, s in self.summary().items()},
            "choices": [asdict(c) for c in self.choices],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The result as a JSON string (see [`to_dict`])."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON to `path` atomically (a kill leaves the old file or the new one, never half)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Mapping) -> SelectionResult:
        """Rebuild a result from [`to_dict`]'s output (the summary is recomputed from the choices)."""
        if not isinstance(data, Mapping) or data.get("format") != SELECTION_FORMAT:
            raise ValueError(f"not a class-word selection: expected a JSON object with format={SELECTION_FORMAT!r}")
        if data.get("version") != SELECTION_VERSION:
            raise ValueError(f"selection file version {data.get('version')!r} is not supported (this pole_hf reads "
                             f"version {SELECTION_VERSION}): re-run the selection")
        try:
            candidates = {str(k): [str(w) for w in v] for k, v in data["candidates"].items()}
            choices = [WordChoice(image=int(c["image"]), image_id=c.get("image_id"), class_name=str(c["class_name"]),
                                  word=str(c["word"]),
                                  probabilities={str(w): float(p) for w, p in c["probabilities"].items()})
                       for c in data["choices"]]
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"malformed selection data ({type(err).__name__}: {err}): re-run the selection") from err
        return cls(candidates=candidates, template=str(data.get("template", SELECTION_TEMPLATE)), choices=choices)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SelectionResult:
        """Read a result written by [`save`]."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"selection file {os.fspath(path)!r} is not valid JSON ({err}): re-run the selection") \
                from err
        return cls.from_dict(data)


def load_candidates(path: str | None, dataset_spec: str = "") -> dict[str, list[str]] | None:
    """Candidate words for a script's `--candidates`: the JSON file `{class: [words]}` at `path`; without one, the
    synthetic world's caption words for a `synthetic` spec, else None (POLE's VOC synonyms apply by default)."""
    if path:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if dataset_spec.startswith("synthetic"):
        return SyntheticWorld().candidates
    return None


def resolve_candidates(model, candidates: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Candidate words per class of `model`, in class order.

    Args:
        model: a [`PolePromptModel`] (its `config.class_names` and `config.class_words` are used).
        candidates: `{class_name: [words]}` (a single string counts as one word). Classes left out keep their
            current word as sole candidate. `None`: POLE's VOC synonyms when every class name is a VOC class,
            otherwise each class's current word.

    Raises:
        ValueError: unknown class names, or a class with no non-empty candidate.
        TypeError: `candidates` is not a dict.
    """
    names = list(model.config.class_names)
    current = dict(zip(names, model.config.class_words))
    if candidates is None:
        if set(names) <= set(VOC_SYNONYMS):
            return {n: list(VOC_SYNONYMS[n]) for n in names}
        return {n: [current[n]] for n in names}
    if not isinstance(candidates, Mapping):
        raise TypeError(f"candidates must be a dict {{class_name: [words]}}, got a {type(candidates).__name__}")
    unknown = sorted(set(candidates) - set(names))
    if unknown:
        raise ValueError(f"candidates name unknown classes {unknown}; known classes: {names}")
    out = {}
    for name in names:
        words = candidates.get(name, [current[name]])
        words = [words] if isinstance(words, str) else list(words)
        words = list(dict.fromkeys(str(w).strip() for w in words if str(w).strip()))
        if not words:
            raise ValueError(f"class {name!r} has no candidate words: give at least one non-empty word")
        out[name] = words
    return out


def clip_input_size(model, processor=None) -> tuple[int, int]:
    """CLIP's input size `(height, width)`: the processor's crop size, else the vision config's `image_size`."""
    crop = getattr(processor, "crop_size", None)
    if isinstance(crop, Mapping) and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    size = model.clip.config.vision_config.image_size
    return int(size), int(size)


def masked_pixel_values(image: Image.Image, cams: torch.Tensor, size: tuple[int, int],
                        processor: PoleImageProcessor) -> torch.Tensor:
    """CAM-masked copies of one image, ready for CLIP: ``[k, 3, h, w]``: the image resized (bicubic) to `size`,
    the CAMs ``[k, H, W]`` (any size) resized (bilinear) and clipped to [0, 1], ``cam * image`` in [0, 1] pixel
    space (the rest turns black), normalised with the processor's mean and std (`pole_hf.objective.masked_images`).
    """
    maps = torch.as_tensor(cams).detach().cpu()
    if maps.ndim != 3:
        raise ValueError(f"CAMs of one image must have shape [k, H, W], got {tuple(maps.shape)}")
    pixels = processor.pixel_values(image, size)
    return masked_images(pixels, maps, torch.zeros(len(maps), dtype=torch.long), image_mean=processor.image_mean,
                         image_std=processor.image_std)[0]


@torch.no_grad()
def candidate_text_features(model, candidates: Mapping[str, Sequence[str]], template: str) -> dict[str, torch.Tensor]:
    """L2-normalised base-CLIP features of `template.format(word)` for every candidate, `{class: [n, D]}`.

    All sentences go through the base CLIP's text tower in one batch.
    """
    if template.count("{}") != 1:
        raise ValueError(f"selection template {template!r} must contain exactly one '{{}}' for the word")
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: load it with from_pretrained or pass tokenizer=")
    sentences = [template.format(w) for words in candidates.values() for w in words]
    inputs = model.tokenizer(sentences, padding=True, return_tensors="pt")
    if inputs["input_ids"].shape[1] > model.max_text_length:
        longest = max(sentences, key=lambda s: len(model.tokenizer(s).input_ids))
        raise ValueError(f"candidate sentence {longest!r} is longer than the text model's {model.max_text_length} "
                         "tokens: use shorter candidate words or template")
    device = model.clip.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    features = F.normalize(internals.projected(model.clip.get_text_features(**inputs)).float(), dim=-1)
    out, start = {}, 0
    for name, words in candidates.items():
        out[name] = features[start: start + len(words)]
        start += len(words)
    return out


def _unpack(item, position: int):
    """``(image, labels, image_id or None)`` from a tuple item or a dataset row (``image``, ``labels``, ``image_id``)."""
    if isinstance(item, Mapping) and "image" in item and "labels" in item:
        image_id = item.get("image_id", item.get("id"))
        return item["image"], item["labels"], None if image_id is None else str(image_id)
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], None if len(item) == 2 or item[2] is None else str(item[2])
    raise ValueError(f"item {position} must be (image, labels), (image, labels, image_id) or a dict with 'image' and "
                     f"'labels', got {type(item).__name__}")


class _MaskedImageScorer:
    """Scores CAM-masked images against each class's candidate sentences, `batch_size` images per CLIP forward."""

    def __init__(self, model, words: dict[str, list[str]], template: str, logit_scale: float, batch_size: int):
        self.model, self.words, self.scale, self.batch_size = model, words, logit_scale, batch_size
        self.text = candidate_text_features(model, words, template)
        self.pending: list[tuple[int, str | None, str, torch.Tensor]] = []
        self.choices: list[WordChoice] = []

    def add(self, position: int, image_id: str | None, name: str, masked: torch.Tensor) -> None:
        self.pending.append((position, image_id, name, masked))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        clip = self.model.clip
        batch = torch.cat([p[3] for p in self.pending]).to(clip.device, clip.dtype)
        with torch.no_grad():
            features = F.normalize(internals.projected(clip.get_image_features(pixel_values=batch)).float(), dim=-1)
        for (position, image_id, name, _), feature in zip(self.pending, features):
            probs = (self.scale * feature @ self.text[name].t()).softmax(-1).cpu().tolist()
            words = self.words[name]
            self.choices.append(WordChoice(position, image_id, name, words[int(np.argmax(probs))],
                                           dict(zip(words, probs))))
        self.pending.clear()


def _given_maps(cams: Sequence, position: int, indices: list[int], scored: list[int]) -> torch.Tensor:
    """The precomputed maps of one image's `scored` classes, from maps given in label order."""
    maps = getattr(cams[position], "cams", cams[position])
    maps = maps.detach().float().cpu() if isinstance(maps, torch.Tensor) else torch.as_tensor(
        np.asarray(maps, dtype=np.float32))
    if maps.ndim == 2:
        maps = maps[None]
    if maps.shape[0] != len(indices):
        raise ValueError(f"cams[{position}] has {maps.shape[0]} maps for {len(indices)} labels: give one map "
                         "per label, in label order")
    return maps[[indices.index(i) for i in scored]]


def select_class_words(model, images_and_labels: Iterable, candidates: Mapping[str, Sequence[str]] | None = None,
                       processor: PoleImageProcessor | None = None, template: str = SELECTION_TEMPLATE,
                       cams: Sequence | None = None, batch_size: int = 32, logit_scale: float | None = None,
                       progress: bool = True, cam_batch_size: int = 8, **cam_kwargs) -> SelectionResult:
    """POLE's class-token selection over a dataset.

    Args:
        model: a [`PolePromptModel`]; its CAMs (when `cams` is not given) and its base CLIP are used, nothing in it
            changes (call `result.apply(model)` to adopt the winners).
        images_and_labels: `(image, labels)` or `(image, labels, image_id)` items, or dataset rows with `image`,
            `labels` and optionally `image_id` (a `datasets.Dataset` of `pole_hf.data`); `image` a PIL image, path
            or array; `labels` a class index (into `model.config.class_names`) or name, or a sequence of them.
        candidates: `{class_name: [words]}`; see [`resolve_candidates`] for the default and the rules.
        processor: the model's [`PoleImageProcessor`] (normalisation; default `PoleImageProcessor.for_model`).
        template: the scoring sentence (POLE's `"A photo of {}."`).
        cams: optional precomputed CAMs aligned with the items: per image a `[k, H, W]` array or tensor (or an object
            with `.cams`) in the order of that image's labels, any size. Default: the model's GradCAMs.
        batch_size: masked images per vision forward.
        logit_scale: softmax temperature multiplier; default `model.get_logit_scale()`.
        progress: show a tqdm progress bar.
        cam_batch_size: images of one computation size per CAM call.
        **cam_kwargs: `scales`, `flip`, `max_side` and `get_cams` options (`refine`, ...).

    Returns:
        [`SelectionResult`] with one [`WordChoice`] per (image, class) and the per-class summary.
    """
    names = list(model.config.class_names)
    words = resolve_candidates(model, candidates)
    processor = processor or PoleImageProcessor.for_model(model)
    size = clip_input_size(model, processor)
    scale = float(model.get_logit_scale()) if logit_scale is None else float(logit_scale)
    scorer = _MaskedImageScorer(model, words, template, scale, batch_size)

    def pairs():  # (position, image_id, image, label indices, scored indices) of images with a word to choose
        total = len(images_and_labels) if hasattr(images_and_labels, "__len__") else None
        for position, item in enumerate(tqdm(images_and_labels, total=total, disable=not progress,
                                             desc="selection")):
            image, labels, image_id = _unpack(item, position)
            indices = class_indices(labels, names)
            scored = [i for i in indices if len(words[names[i]]) > 1]
            for i in indices:  # a single candidate wins without scoring
                if len(words[names[i]]) == 1:
                    scorer.choices.append(WordChoice(position, image_id, names[i], words[names[i]][0],
                                                     {words[names[i]][0]: 1.0}))
            if scored:
                yield position, image_id, load_image(image), indices, scored

    if cams is None:
        with_maps = ((pair, output.cams) for pair, output in iter_cams(
            model, processor, pairs(), image=lambda pair: pair[2], targets=lambda pair: pair[4],
            batch_size=cam_batch_size, **cam_kwargs))
    else:
        with_maps = ((pair, _given_maps(cams, pair[0], pair[3], pair[4])) for pair in pairs())
    for (position, image_id, image, _, scored), image_maps in with_maps:
        masked = masked_pixel_values(image, image_maps, size, processor)
        for row, i in enumerate(scored):
            scorer.add(position, image_id, names[i], masked[row: row + 1])
    scorer.flush()
    result = SelectionResult(candidates=words, template=template, choices=scorer.choices)
    result.choices.sort(key=lambda c: (c.image, names.index(c.class_name)))
    return result


def pair_words(result: SelectionResult) -> dict[tuple[int, str], str]:
    """Each (image position, class name) pair's chosen word, as POLE trains with them (not the dataset vote)."""
    return {(c.image, c.class_name): c.word for c in result.choices}


def with_pair_words(dataset, result: SelectionResult, column: str = "class_words"):
    """`dataset` with a `column` of per-image word lists, one word per label in sorted label order, from a
    selection run over the same rows (positions); training reads each pair's word from it.

    Raises:
        ValueError: a labelled (image, class) pair the selection did not score, naming the first one.
    """
    names = dataset.features["labels"].feature.names
    chosen = pair_words(result)
    rows = []
    for position, labels in enumerate(dataset["labels"]):
        words = []
        for index in sorted(set(labels)):
            word = chosen.get((position, names[index]))
            if word is None:
                raise ValueError(f"the selection has no word for image {position}, class {names[index]!r}: run the "
                                 "selection over the same dataset rows (same --num_images and seed)")
            words.append(word)
        rows.append(words)
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, rows)


__all__ = [
    "ClassSummary",
    "SelectionResult",
    "WordChoice",
    "candidate_text_features",
    "clip_input_size",
    "masked_pixel_values",
    "pair_words",
    "resolve_candidates",
    "select_class_words",
    "with_pair_words",
]
