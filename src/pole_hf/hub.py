"""Sharing prompts on the Hub: model cards rendered from the package's template, and prompts-only pushes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants

TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_cards", "pole_prompts.md")
SEGMENTATION_TEMPLATE_PATH = os.path.join(os.path.dirname(TEMPLATE_PATH), "segmentation.md")
TAGS = ["weakly-supervised-semantic-segmentation", "clip", "prompt-learning", "pole_hf"]
SELECTION_FILE = "selection.json"
METRIC_NAMES = {"cam_miou": "CAM mIoU", "mask_miou": "Pseudo-mask mIoU", "val_miou": "Segmentation mIoU"}


@dataclass
class PoleEvalResult:
    """One evaluation result for a model card.

    Args:
        metric: `"cam_miou"` or `"mask_miou"` (or another metric id).
        value: the value in percent.
        dataset: dataset id or name (e.g. `"voc2012"` or `"pole_hf/synthetic"`).
        split: the split evaluated.
        background: how background was scored, e.g. `"(1 - max cam)^1"` or `"threshold 0.4"`.
        dataset_name: a display name (default: `dataset`).
    """

    metric: str
    value: float
    dataset: str
    split: str = "train"
    background: str = ""
    dataset_name: str | None = None

    def to_hub(self) -> EvalResult:
        return EvalResult(task_type="image-segmentation", task_name="Weakly supervised semantic segmentation",
                          dataset_type=self.dataset, dataset_name=self.dataset_name or self.dataset,
                          dataset_split=self.split, metric_type="mean_iou",
                          metric_name=METRIC_NAMES.get(self.metric, self.metric),
                          metric_value=round(float(self.value), 2),
                          metric_config=self.background or None)


def render_model_card(model, repo_id: str | None = None, datasets: Sequence[str] | None = None,
                      eval_results: Sequence[PoleEvalResult] = (), training: dict | None = None,
                      prompts_size: int | None = None, license: str | None = "apache-2.0",
                      learned: bool | None = None) -> ModelCard:
    """Render the prompts' model card with huggingface_hub's `ModelCard` from the package template.

    Args:
        model: a `PolePromptModel`, or a `PoleConfig` (untouched prompts of that configuration).
        repo_id: the repo the card is for (used in the usage snippet).
        datasets: training datasets (card metadata).
        eval_results: CAM / pseudo-mask mIoU results, shown in the card and as `model-index` metadata.
        training: training settings to list (seed, steps, loss weights, versions...).
        prompts_size: size in bytes of the prompts file, for the text.
        license: the card's license field.
        learned: whether the class tokens were learned (default: a model's trainable prompt parameters; a
            configuration's are untouched).
    """
    import pole_hf

    config = getattr(model, "config", model)
    base = config.base_model_name_or_path
    hub_base = base if base and not os.path.isdir(base) else None
    name = repo_id.split("/")[-1] if repo_id else "pole-prompts"
    card_data = ModelCardData(
        base_model=hub_base, library_name="pole_hf", tags=list(TAGS), license=license,
        datasets=list(datasets) if datasets else None, pipeline_tag="image-segmentation", model_name=name,
        eval_results=[r.to_hub() for r in eval_results] or None,
    )
    training_rows = dict(training or {})
    training_rows.setdefault("pole_hf version", pole_hf.__version__)
    if learned is None:
        learned = hasattr(model, "learnable_parameters") and any(p.requires_grad for p in model.learnable_parameters())
    return ModelCard.from_template(
        card_data, template_path=TEMPLATE_PATH, model_name=name, repo_id=repo_id or "path/to/prompts",
        base_model=hub_base, base_revision=config.base_model_revision,
        prompts_size=f"{prompts_size / 1024:.1f} KB" if prompts_size else "small",
        example_labels=", ".join(repr(n) for n in config.class_names[:2]), template=config.template,
        class_token_length=describe_class_tokens(config), learned=learned,
        class_rows=list(zip(config.class_names, config.class_words)),
        background_words=", ".join(config.background_words) or "none",
        eval_rows=[dict(name=METRIC_NAMES.get(r.metric, r.metric), dataset=r.dataset_name or r.dataset,
                        split=r.split, value=f"{r.value:.2f}", background=r.background or "-") for r in eval_results],
        training=sorted(training_rows.items()),
    )


def render_segmentation_card(model, dataset: str, val_miou: float, val_split: str = "val",
                             val_images: int | None = None, pseudo_mask_miou: float | None = None,
                             masks_from: str | None = None, repo_id: str | None = None,
                             base_model: str | None = None, training: dict | None = None,
                             license: str | None = "apache-2.0") -> ModelCard:
    """Render the card of a segmentation model trained on pseudo masks (stage 3) from the package template.

    Args:
        model: the trained transformers model (its `config.id2label` lists the classes).
        dataset: the dataset id or name (`"synthetic"`, `"voc2012"`...).
        val_miou: val mIoU in percent, against ground truth (`model-index`).
        val_split: the split it was measured on.
        val_images: how many images were scored.
        pseudo_mask_miou: mIoU in percent of the training pseudo masks against ground truth (`model-index`, train).
        masks_from: the prompts repo / folder or CAM network the masks came from; `"ground truth"` (or None) for a
            model trained on ground-truth masks.
        repo_id: the repo the card is for (used in the usage snippet).
        base_model: the checkpoint the model started from (a Hub id), or None for random weights.
        training: training settings to list.
        license: the card's license field.
    """
    import pole_hf

    weakly = bool(masks_from) and masks_from != "ground truth"
    hub_base = base_model if base_model and not os.path.isdir(base_model) else None
    evals = [PoleEvalResult("val_miou", val_miou, dataset, val_split)]
    if pseudo_mask_miou is not None:
        evals.append(PoleEvalResult("mask_miou", pseudo_mask_miou, dataset, "train"))
    name = repo_id.split("/")[-1] if repo_id else "pole-segmentation"
    card_data = ModelCardData(
        base_model=hub_base, library_name="transformers", license=license, datasets=[dataset],
        pipeline_tag="image-segmentation", model_name=name, eval_results=[r.to_hub() for r in evals],
        tags=[*TAGS[:1], "semantic-segmentation", "pole_hf"] if weakly else ["semantic-segmentation", "pole_hf"],
    )
    rows = dict(training or {})
    rows.setdefault("pole_hf version", pole_hf.__version__)
    counts = {"val_miou": val_images}
    return ModelCard.from_template(
        card_data, template_path=SEGMENTATION_TEMPLATE_PATH, model_name=name, repo_id=repo_id or "path/to/model",
        architecture=type(model).__name__, weakly_supervised=weakly, masks_from=masks_from,
        pseudo_mask_miou=f"{pseudo_mask_miou:.2f}" if pseudo_mask_miou is not None else None, base_model=hub_base,
        labels=", ".join(f"{i} {label}" for i, label in sorted(model.config.id2label.items())),
        eval_rows=[dict(name=METRIC_NAMES[r.metric], dataset=r.dataset, split=r.split,
                        images=counts.get(r.metric) or "-", value=f"{r.value:.2f}") for r in evals],
        training=sorted((k, str(v)) for k, v in rows.items()),
    )


def describe_class_tokens(config) -> str:
    """How many class-token vectors each class has, in words, for the model card."""
    if config.learnable_tokens == "first":
        return "1 learnable (the word's first token; its other tokens fixed, DeFo-style)"
    if config.class_token_length is None:
        return "one per token of the class word"
    return f"{config.class_token_length} (longer words averaged into that many groups)"


HUB_TIMEOUT = float(os.environ.get("POLE_HF_HUB_TIMEOUT", "120"))
"""Seconds any one Hub request of a push may wait for an answer (env `POLE_HF_HUB_TIMEOUT`; huggingface_hub's
own client waits forever)."""


@contextlib.contextmanager
def hub_timeout(seconds: float, what: str) -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client a timeout for the block; a stall becomes one `TimeoutError` line.

    Args:
        seconds: the per-request timeout (connect, read, write).
        what: what is being done, for the message (e.g. "pushing to me/voc-prompts").
    """
    try:
        import httpx2
    except ImportError:  # huggingface_hub 1.x is built on httpx
        import httpx as httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(factory)
    try:
        yield
    except httpx2.TimeoutException as err:
        raise TimeoutError(f"{what}: the Hub ({constants.ENDPOINT}) did not answer within {seconds:g} s "
                           f"({type(err).__name__}): check the endpoint, or raise POLE_HF_HUB_TIMEOUT") from None
    finally:
        set_client_factory(previous)


def saved_card(folder: str, repo_id: str) -> ModelCard | None:
    """The model card a training run wrote into `folder` (README.md), its usage snippet pointed at `repo_id`;
    None when there is none. Pushing it keeps its `model-index`, datasets and training table."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return None
    return ModelCard(ModelCard.load(path).content.replace("path/to/prompts", repo_id))


def push_prompts_to_hub(model, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                        token: str | bool | None = None, revision: str | None = None, include_base: bool = False,
                        selection_file: str | None = None, card: ModelCard | None = None,
                        timeout: float | None = None, **card_kwargs) -> str:
    """Push a prompts-only folder (config, safetensors, selection JSON when given, model card) to `repo_id`.

    Args:
        timeout: seconds each Hub request may wait (default `HUB_TIMEOUT`); a stalled server raises `TimeoutError`.

    Returns:
        the commit URL.
    """
    with hub_timeout(HUB_TIMEOUT if timeout is None else timeout, f"pushing to {repo_id}"):
        return _push(model, repo_id, commit_message, private, token, revision, include_base, selection_file, card,
                     card_kwargs)


def _push(model, repo_id, commit_message, private, token, revision, include_base, selection_file, card,
          card_kwargs) -> str:
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, include_base=include_base)
        if selection_file is not None:
            with open(selection_file, "rb") as src, open(os.path.join(folder, SELECTION_FILE), "wb") as dst:
                dst.write(src.read())
        if card is None:
            size = os.path.getsize(os.path.join(folder, "model.safetensors"))
            card = render_model_card(model, repo_id=repo_id, prompts_size=size, **card_kwargs)
        card.save(os.path.join(folder, "README.md"))
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, token=token,
                                 commit_message=commit_message or "Upload POLE prompts")
    return info.commit_url
