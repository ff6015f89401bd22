"""Prompts-only saving and loading, Auto classes, remote code, and refusal of bad prompt files."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, CLIPModel

from pole_hf import PoleConfig, PolePromptModel
from pole_hf.tiny import build_tiny_clip


@pytest.fixture()
def saved(tiny_model, tmp_path):
    optimizer = torch.optim.SGD(tiny_model.learnable_parameters(), lr=0.5)
    tiny_model.get_text_features()[:3].sum().backward()
    optimizer.step()  # the saved prompts differ from their initialisation
    tiny_model.save_pretrained(tmp_path / "prompts")
    return tiny_model, tmp_path / "prompts"


def test_round_trip_gives_identical_logits(saved):
    model, path = saved
    loaded = PolePromptModel.from_pretrained(path)
    pixels = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, atol=0, rtol=0)
        torch.testing.assert_close(loaded(pixels).background_logits, model(pixels).background_logits, atol=0, rtol=0)
    assert loaded.config.class_names == ["cat", "dog", "sofa"]


def test_prompts_file_holds_only_prompt_tensors(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("prompt_learner.") for k in keys)
    assert "prompt_learner.class_tokens" in keys
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "pole" and config["base_model_name_or_path"]
    assert config["clip_config"]["text_config"]["hidden_size"] == 32
    # the base's machine-local folder is not written into the embedded CLIP config, and stays on the live model
    assert os.path.isabs(model.config.clip_config._name_or_path)
    assert not config["clip_config"].get("_name_or_path")


def test_auto_classes_return_pole_model(saved):
    _, path = saved
    assert isinstance(AutoConfig.from_pretrained(path), PoleConfig)
    assert isinstance(AutoModel.from_pretrained(path), PolePromptModel)


def test_loaded_prompts_train_only_prompts(saved):
    _, path = saved
    loaded = AutoModel.from_pretrained(path)
    assert not any(p.requires_grad for p in loaded.clip.parameters())
    assert loaded.prompt_learner.class_tokens.requires_grad


def test_base_model_argument_is_used(saved, tiny_clip_dir):
    _, path = saved
    base = CLIPModel.from_pretrained(tiny_clip_dir)
    loaded = PolePromptModel.from_pretrained(path, base_model=base)
    assert loaded.clip is base


def test_standalone_copy_loads_without_the_base(tiny_model, tmp_path):
    base = tmp_path / "base-clip"
    build_tiny_clip(str(base), seed=1)
    model = PolePromptModel.from_clip(str(base), class_names=["cat", "dog"], background_words=["sky"])
    model.save_pretrained(tmp_path / "standalone", include_base=True)
    shutil.rmtree(base)
    loaded = PolePromptModel.from_pretrained(tmp_path / "standalone")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)
    assert os.path.isfile(tmp_path / "standalone" / "base" / "model.safetensors")


def test_vit_b16_sized_prompt_file_is_under_one_megabyte(vit_b16_clip, tiny_tokenizer, tmp_path):
    from pole_hf.vocab import CLIP_ES_BACKGROUND_WORDS, VOC_CLASSES

    model = PolePromptModel.from_clip(vit_b16_clip, class_names=list(VOC_CLASSES), tokenizer=tiny_tokenizer,
                                      background_words=list(CLIP_ES_BACKGROUND_WORDS))
    assert model.prompt_learner.class_tokens.shape == (20, 1, 512)
    model.save_pretrained(tmp_path / "voc")
    size = os.path.getsize(tmp_path / "voc" / "model.safetensors")
    assert size < 1_000_000, size


def test_prompts_on_a_mismatched_base_name_both_shapes(saved, tmp_path):
    _, path = saved
    other = tmp_path / "wide-clip"
    build_tiny_clip(str(other), text_width=48, heads=2)
    with pytest.raises(ValueError, match="text width 32, but the base has 48"):
        PolePromptModel.from_pretrained(path, base_model=CLIPModel.from_pretrained(other))


def _rewrite(path, mutate):
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mutate(tensors)
    save_file(tensors, str(file))


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.pop("prompt_learner.class_tokens"), r"missing \['prompt_learner.class_tokens'\]"),
    (lambda t: t.update(extra=torch.zeros(2)), r"unexpected \['extra'\]"),
    (lambda t: t.update({"prompt_learner.class_tokens": torch.zeros(2, 1, 32)}), r"shape \(2, 1, 32\)"),
    (lambda t: t.update({"prompt_learner.class_tokens": torch.zeros(3, 1, 32, dtype=torch.int64)}),
     "expected a floating point"),
    (lambda t: t.update({"prompt_learner.prefix_ids": torch.tensor([10**6])}), "outside the base vocabulary"),
])
def test_bad_prompt_tensors_are_refused(saved, mutate, message):
    _, path = saved
    _rewrite(path, mutate)
    with pytest.raises(ValueError, match=message):
        PolePromptModel.from_pretrained(path)


def test_config_class_list_disagreeing_with_tensors(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["class_names"].append("horse")
    config["class_words"].append("horse")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"class_tokens has shape \(3, 1, 32\) but .* expect \(4, 1, 32\)"):
        PolePromptModel.from_pretrained(path)


def test_truncated_safetensors_is_refused(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PolePromptModel.from_pretrained(path)


def test_pickle_weights_are_never_loaded(saved):
    _, path = saved
    os.remove(path / "model.safetensors")
    marker = path / "unpickled"
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')"

    class Evil:
        def __reduce__(self):
            return (exec, (payload,))

    torch.save({"x": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle file: pole_hf never unpickles"):
        PolePromptModel.from_pretrained(path)
    assert not marker.exists()


def test_remote_code_registration_is_refused_in_one_line():
    with pytest.raises(NotImplementedError, match="pip install pole_hf"):
        PolePromptModel.register_for_auto_class("AutoModel")


def test_base_without_tokenizer_loads_from_stored_ids_with_one_lookup(saved, tiny_clip_dir, tmp_path, monkeypatch):
    import pole_hf.loading

    model, path = saved
    base = tmp_path / "base-without-tokenizer"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_clip_dir, name), base / name)
    config = json.loads((path / "config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (path / "config.json").write_text(json.dumps(config))
    calls = []
    real = pole_hf.loading.load_base_tokenizer

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pole_hf.loading, "load_base_tokenizer", counting)
    loaded = PolePromptModel.from_pretrained(path)
    assert loaded.tokenizer is None and len(calls) == 1
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)
    # building prompts needs the words' ids: a base without tokenizer files is refused, not tokenized to <|endoftext|>
    with pytest.raises(OSError, match="base-without-tokenizer has no tokenizer files"):
        PolePromptModel.from_clip(str(base), class_names=["cat"])


@pytest.mark.parametrize(("tamper", "pattern"), [
    (lambda t: t.update(class_token_lengths=torch.zeros_like(t["class_token_lengths"])), "class_token_lengths"),
    (lambda t: t.update(class_token_lengths=-torch.ones_like(t["class_token_lengths"])), "class_token_lengths"),
    (lambda t: t.update(class_token_lengths=t["class_token_lengths"][:2]), "class_token_lengths"),
    (lambda t: t.update(background_ids=t["background_ids"][:2], background_lengths=t["background_lengths"][:2]),
     "one row per background word"),
    (lambda t: t.update(background_lengths=t["background_lengths"] + 100), "background_lengths"),
    (lambda t: t["class_tokens"].view(-1)[0].fill_(float("nan")), "class_tokens holds NaN or Inf"),
    (lambda t: t["class_tokens"].view(-1)[1].fill_(float("inf")), "class_tokens holds NaN or Inf"),
], ids=["lengths-0", "lengths-neg", "lengths-short", "background-rows", "background-lengths", "nan", "inf"])
def test_tampered_prompt_buffers_are_refused_naming_the_file(saved, tamper, pattern):
    from safetensors.torch import load_file, save_file

    _, path = saved
    file = path / "model.safetensors"
    tensors = {k.split(".", 1)[1]: v for k, v in load_file(file).items()}
    tamper(tensors)
    save_file({f"prompt_learner.{k}": v.contiguous() for k, v in tensors.items()}, file)
    with pytest.raises(ValueError, match=pattern) as error:
        PolePromptModel.from_pretrained(path)
    assert str(file) in str(error.value) and "\n" not in str(error.value)


def test_save_over_existing_prompts_on_a_full_disk_keeps_the_old_files(saved, monkeypatch):
    import errno

    import pole_hf.atomic

    model, path = saved
    before = {name: (path / name).read_bytes() for name in ("config.json", "model.safetensors")}
    model.config.template = "a changed {}."

    calls = []
    real_fsync = os.fsync

    def full_disk(fd):  # the prompts file (written first) fits; config.json hits the full disk
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(pole_hf.atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(path)
    assert (path / "config.json").read_bytes() == before["config.json"]  # whole, not a truncated new one
    assert PolePromptModel.from_pretrained(path).config.template != "a changed {}."
    assert not [name for name in os.listdir(path) if name.endswith(".tmp")]
