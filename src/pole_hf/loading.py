"""Saving and loading prompts like a PEFT adapter: config.json + a prompts-only safetensors beside a base CLIP reference.

No prompt file is ever unpickled: only safetensors files are read, and a prompts repo that only offers a pickle is
refused. The base CLIP is loaded by transformers (safetensors when present; a `pytorch_model.bin`-only base goes
through `torch.load(weights_only=True)`, which restores tensors and runs no code).
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPModel
from transformers.utils import cached_file

from .atomic import atomic_path, atomic_write_text
from .bundled import TINY_PROMPTS, resolve_base_path
from .configuration_pole import PoleConfig
from .image_processing_pole import PoleImageProcessor, base_image_processor

PROMPTS_FILE = "model.safetensors"
BASE_SUBFOLDER = "base"
PICKLE_FILES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt", "prompts.bin")
ID_TENSORS = ("prefix_ids", "suffix_ids", "class_token_lengths", "background_ids", "background_lengths",
              "class_tail_ids", "class_tail_lengths")
HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")


def load_base_clip(path: str | None, revision: str | None = None, subfolder: str = "", **hub_kwargs) -> CLIPModel:
    """Load the base `CLIPModel` from a Hub id or local folder (honours the cache and `HF_HUB_OFFLINE=1`).

    Weights load in float32 unless `dtype=` is given (a folder stored in fp16, like the bundled tiny CLIP, would
    otherwise compute in fp16 under transformers 5's `dtype="auto"`).
    """
    path = resolve_base_path(path)
    hub_kwargs.setdefault("dtype", torch.float32)
    try:
        model = CLIPModel.from_pretrained(path, revision=revision, subfolder=subfolder, **hub_kwargs)
    except OSError as err:
        raise OSError(f"could not load the base CLIP {path!r} (revision {revision}): {str(err).splitlines()[0]}") \
            from err
    return model.eval()


def cached_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a Hub repo's `config.json` was last fetched at (read from the local cache, works offline)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(found, str):
        return None
    parts = os.path.normpath(found).split(os.sep)
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def load_base_tokenizer(path: str | None, revision: str | None = None, subfolder: str = "", **hub_kwargs):
    """Load the base CLIP's tokenizer (same lookup as :func:`load_base_clip`)."""
    path = resolve_base_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, subfolder=subfolder, **hub_kwargs)
    # transformers 5 builds a CLIP tokenizer with only its special tokens when the folder has no tokenizer files;
    # it would map every word to <|endoftext|>
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        where = f"{path}/{subfolder}" if subfolder else path
        raise OSError(f"{where} has no tokenizer files (tokenizer.json or vocab.json + merges.txt): add them or pass "
                      "tokenizer=...")
    return tokenizer


def try_load_base_tokenizer(path: str | None, revision: str | None = None, **hub_kwargs):
    """:func:`load_base_tokenizer`, or `None` when the base has no loadable tokenizer (prompts files carry their ids)."""
    try:
        return load_base_tokenizer(path, revision=revision, **hub_kwargs)
    except (OSError, ValueError):
        return None


def prompt_state_dict(model) -> dict[str, torch.Tensor]:
    """The prompt tensors of a model: everything except the base CLIP's weights."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}


def save_prompts(model, save_directory: str | os.PathLike, include_base: bool = False, push_to_hub: bool = False,
                 **kwargs) -> None:
    """Write config.json and a prompts-only model.safetensors (atomically); optionally a copy of the base CLIP.

    Args:
        model: a `PolePromptModel`.
        save_directory: output folder (created).
        include_base: also save the base CLIP, its tokenizer and image processor under `base/`, making the folder
            standalone (`config.base_subfolder` then points there).
        push_to_hub: push the saved folder to `kwargs["repo_id"]` (default: the folder's name) afterwards.
        **kwargs: `repo_id` and hub options for `push_to_hub`; transformers' saving options are accepted and ignored.
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file: give a folder path")
    os.makedirs(save_directory, exist_ok=True)
    processor = PoleImageProcessor.for_model(model)
    base_processor = base_image_processor(model.config, model.config.name_or_path) if include_base else None
    config = copy.deepcopy(model.config)  # the live model keeps its own config (base folder and all)
    config.architectures = [type(model).__name__]
    config.base_subfolder = BASE_SUBFOLDER if include_base else None
    if include_base:
        base_dir = os.path.join(save_directory, BASE_SUBFOLDER)
        model.clip.save_pretrained(base_dir)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(base_dir)
        if base_processor is not None:
            base_processor.save_pretrained(base_dir)
    processor.save_pretrained(save_directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in prompt_state_dict(model).items()}
    with atomic_path(os.path.join(save_directory, PROMPTS_FILE)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "pole_hf": "prompts"})
    atomic_write_text(os.path.join(save_directory, "config.json"), config.to_json_string(use_diff=True))
    if push_to_hub:
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
        model.push_to_hub(repo_id, **{k: v for k, v in kwargs.items() if k in ("token", "private", "revision",
                                                                              "commit_message")})


def load_prompts(cls, path: str | os.PathLike, *, base_model: CLIPModel | None = None, tokenizer=None,
                 config: PoleConfig | None = None, revision: str | None = None, subfolder: str = "",
                 dtype: torch.dtype | str | None = None, **kwargs):
    """Load a prompt repo or folder and its base CLIP into a `cls` (a `PolePromptModel`).

    Args:
        path: Hub id or local folder holding config.json and model.safetensors.
        base_model: an already loaded base `CLIPModel` to use instead of loading `config.base_model_name_or_path`.
        tokenizer: the base's tokenizer, when `base_model` is given and its folder is not at hand.
        config: a `PoleConfig` to use instead of the saved one.
        revision: revision of the prompt repo; the base's own revision is `config.base_model_revision`.
        subfolder: subfolder of the repo that holds the prompts.
        dtype: dtype of the base CLIP's weights (prompts stay float32).
        **kwargs: hub options (`cache_dir`, `token`, `local_files_only`, `force_download`); others are ignored.
    """
    path = os.fspath(path)
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    dtype = kwargs.pop("torch_dtype", dtype)
    if config is None:
        config = PoleConfig.from_pretrained(path, revision=revision, subfolder=subfolder, **hub)
    prompts_file = cached_file(path, PROMPTS_FILE, revision=revision, subfolder=subfolder,
                               _raise_exceptions_for_missing_entries=False, **hub)
    if prompts_file is None:
        for name in PICKLE_FILES:
            if cached_file(path, name, revision=revision, subfolder=subfolder,
                           _raise_exceptions_for_missing_entries=False, **hub):
                raise ValueError(f"{path} holds {name}, a pickle file: pole_hf never unpickles weights; "
                                 f"re-save the prompts as {PROMPTS_FILE} with a trusted tool")
        raise OSError(f"{path} has no {PROMPTS_FILE}: is it a pole_hf prompt folder or repo?")
    base_kwargs = dict(hub)
    if dtype is not None:
        base_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if base_model is None:
        base_sub = getattr(config, "base_subfolder", None)
        if base_sub:
            inner = os.path.join(subfolder, base_sub) if subfolder else base_sub
            base_model = load_base_clip(path, revision=revision, subfolder=inner, **base_kwargs)
            tokenizer = tokenizer or load_base_tokenizer(path, revision=revision, subfolder=inner, **hub)
        else:
            base_model = load_base_clip(config.base_model_name_or_path, revision=config.base_model_revision,
                                        **base_kwargs)
    if config.clip_config is not None:
        check_base_matches(config.clip_config, base_model.config, path)
    if tokenizer is None:
        tokenizer = try_load_base_tokenizer(config.base_model_name_or_path or base_model.config.name_or_path,
                                            revision=config.base_model_revision, **hub)
    model = cls(config, clip_model=base_model, tokenizer=tokenizer, load_tokenizer=False)
    if not model.config.name_or_path:  # where it came from, as transformers' from_pretrained records it: the
        model.config.name_or_path = path  # processor saved beside the prompts is found there (PoleImageProcessor)
    load_prompt_tensors(model, prompts_file)
    return model.eval()


def load_prompt_model(model: str | None = None, base: str | None = None, preset: str | None = None, cls=None,
                      **kwargs):
    """The prompt model a script or the CLI asks for: saved prompts (`model`), or fresh, untouched prompts of a
    published setting (`preset`, see `pole_hf.vocab.PROMPT_PRESETS`) on `base`; the bundled prompts when neither.

    Args:
        model: a prompts folder or Hub repo (default: `pole_hf.TINY_PROMPTS` when no preset is given).
        base: the base CLIP of a preset (default: the bundled tiny CLIP); with `model`, the base to load it onto.
        preset: `"clip-es-voc"` or `"pole-voc"`; cannot be combined with `model`.
        cls: the model class (default `PolePromptModel`).
        **kwargs: more `from_clip` options (with a preset) or `from_pretrained` options.
    """
    if cls is None:
        from .modeling_pole import PolePromptModel as cls
    if preset is not None:
        if model is not None:
            raise ValueError(f"give saved prompts ({model!r}) or a preset ({preset!r}), not both: a preset builds "
                             "fresh prompts on --base")
        return cls.from_clip(resolve_base_path(base), preset=preset, **kwargs)
    if base is not None:
        kwargs["base_model"] = load_base_clip(base)
        kwargs.setdefault("tokenizer", try_load_base_tokenizer(base))
    return cls.from_pretrained(model or TINY_PROMPTS, **kwargs)


def check_base_matches(saved, base, where: str) -> None:
    """Raise when prompts learned on `saved` (a CLIPConfig) cannot sit on `base`: text width, vocabulary, projection."""
    pairs = {
        "text width": (saved.text_config.hidden_size, base.text_config.hidden_size),
        "vocabulary size": (saved.text_config.vocab_size, base.text_config.vocab_size),
        "projection dim": (saved.projection_dim, base.projection_dim),
    }
    for name, (want, have) in pairs.items():
        if want != have:
            raise ValueError(f"prompts in {where} were learned on a CLIP with {name} {want}, but the base has "
                             f"{have}: load them onto the base they were learned on")


def _check_id_tensors(tensors: dict[str, torch.Tensor], config, filename: str) -> None:
    """Shapes and ranges of the id/length buffers and finiteness of the learned tensors: a tampered or mismatched
    file is refused in one line (it would otherwise score classes against the wrong prompts, silently)."""
    num_classes, num_background = len(config.class_names), len(config.background_words)

    def refuse(what: str) -> None:
        raise ValueError(f"{filename}: {what}: the file is damaged or belongs to other prompts; re-save or "
                         "re-download it")

    lengths = tensors["prompt_learner.class_token_lengths"]
    if tuple(lengths.shape) != (num_classes,) or (num_classes and int(lengths.min()) < 1):
        refuse(f"class_token_lengths {lengths.tolist()} must hold one length >= 1 for each of the {num_classes} "
               "classes")
    ids, rows = tensors["prompt_learner.background_ids"], tensors["prompt_learner.background_lengths"]
    if ids.ndim != 2 or ids.shape[0] != num_background or tuple(rows.shape) != (num_background,):
        refuse(f"background_ids {tuple(ids.shape)} / background_lengths {tuple(rows.shape)} must have one row per "
               f"background word ({num_background})")
    if num_background and (int(rows.min()) < 2 or int(rows.max()) > ids.shape[1]):
        refuse(f"background_lengths {rows.tolist()} must lie in 2..{ids.shape[1]} (BOS and EOS included)")
    for name in ("prompt_learner.prefix_ids", "prompt_learner.suffix_ids"):
        if tensors[name].ndim != 1 or tensors[name].numel() == 0:
            refuse(f"{name.split('.')[-1]} must be a non-empty list of token ids")
    tail = tensors.get("prompt_learner.class_tail_lengths")
    if tail is not None and (tuple(tail.shape) != (num_classes,) or (tail.numel() and int(tail.min()) < 0)):
        refuse(f"class_tail_lengths {tail.tolist()} must hold one length >= 0 per class")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            refuse(f"{name} holds NaN or Inf values")


def load_prompt_tensors(model, filename: str) -> None:
    """Copy the tensors of a prompts safetensors file into `model`, checking names, shapes and dtypes."""
    expected = prompt_state_dict(model)
    try:
        with safe_open(filename, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers or truncated data
        raise ValueError(f"{filename} is not a readable safetensors file ({err}): re-save or re-download it") \
            from err
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{filename} does not match this model's prompts: missing {missing}, unexpected {extra}")
    vocab = model.clip.config.text_config.vocab_size
    learner = model.prompt_learner
    per_class = learner.fixed_length is None and learner.learnable_tokens == "all"
    for name, tensor in tensors.items():
        short = name.split(".")[-1]
        if short in ID_TENSORS:
            if tensor.is_floating_point() or tensor.dtype == torch.bool:
                raise ValueError(f"{filename}: {name} has dtype {tensor.dtype}, expected integer token ids")
            if name.endswith("_ids") and tensor.numel() and (tensor.min() < 0 or tensor.max() >= vocab):
                raise ValueError(f"{filename}: {name} has token ids outside the base vocabulary of size {vocab}")
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{filename}: {name} has dtype {tensor.dtype}, expected a floating point tensor")
        want = tuple(expected[name].shape)
        if name == "prompt_learner.context":
            want = (tensors["prompt_learner.prefix_ids"].numel() - 1, want[1])
        if name == "prompt_learner.class_tokens" and per_class and tensor.ndim == 3 and tensor.shape[1] >= 1:
            want = (want[0], tensor.shape[1], want[2])  # a per-class length: as many slots as the file's longest word
        if tuple(tensor.shape) != want:
            raise ValueError(f"{filename}: {name} has shape {tuple(tensor.shape)} but this config and base CLIP "
                             f"expect {want}: the prompts were saved for other classes or another base")
    _check_id_tensors(tensors, model.config, filename)
    slots = tensors["prompt_learner.class_tokens"].shape[1]
    if int(tensors["prompt_learner.class_token_lengths"].max()) > slots:
        raise ValueError(f"{filename}: class_token_lengths exceed the {slots} class-token slots it holds")
    tail_ids = tensors.get("prompt_learner.class_tail_ids")
    tail_lengths = tensors.get("prompt_learner.class_tail_lengths")
    if tail_ids is not None and tail_lengths.numel() and int(tail_lengths.max()) > tail_ids.shape[-1]:
        raise ValueError(f"{filename}: class_tail_lengths exceed the {tail_ids.shape[-1]} tail token ids it holds: "
                         "re-save the prompts")
    with torch.no_grad():
        device = learner.class_tokens.device
        learner.resize_class_tokens(slots)
        for short in ID_TENSORS:
            if f"prompt_learner.{short}" in tensors:
                setattr(learner, short, tensors[f"prompt_learner.{short}"].to(device=device, dtype=torch.long))
        if learner.context is not None:
            learner.context = torch.nn.Parameter(tensors["prompt_learner.context"].to(device).float())
        params = dict(model.named_parameters())
        for name, tensor in tensors.items():
            if name in params and name != "prompt_learner.context":
                params[name].copy_(tensor.to(params[name].dtype))
