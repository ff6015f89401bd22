"""Class words of several tokens: untouched prompts are their sentences, words of different lengths switch, learn,
save and load; prompts saved by pole_hf 0.1.0 load identically; POLE's DeFo-style first-token variant."""

import os

import pytest
import torch
from helpers import fit_labels, sentence_features
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pole_hf import PolePromptModel

DATA = os.path.join(os.path.dirname(__file__), "data")
LONG_WORDS = {"cat": "cat", "table": "dining table", "person": "person with clothes,people,human"}


def long_word_model(tiny_clip_dir, **options):
    options.setdefault("background_words", ["sky"])
    return PolePromptModel.from_clip(tiny_clip_dir, class_names=list(LONG_WORDS), class_words=LONG_WORDS, **options)


@pytest.mark.parametrize("options", [
    {},
    {"template": "a clean origami {}."},
    {"template": "{}"},
    {"learn_context": True},
    {"learnable_tokens": "first"},
    {"learnable_tokens": "first", "learn_context": True, "template": "A photo of {}."},
])
def test_untouched_prompts_are_their_sentences(tiny_clip_dir, tiny_clip, tiny_tokenizer, options):
    model = long_word_model(tiny_clip_dir, **options)
    template = options.get("template", "a photo of a {}.")
    assert len(tiny_tokenizer(LONG_WORDS["person"], add_special_tokens=False).input_ids) > 5
    with torch.no_grad():
        features = model.get_text_features()
    sentences = [template.format(w) for w in [*LONG_WORDS.values(), "sky"]]
    reference = sentence_features(tiny_clip, tiny_tokenizer, sentences)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)


def test_default_keeps_every_token(tiny_clip_dir, tiny_tokenizer):
    model = long_word_model(tiny_clip_dir)
    counts = [len(tiny_tokenizer(w, add_special_tokens=False).input_ids) for w in LONG_WORDS.values()]
    learner = model.prompt_learner
    assert learner.class_token_lengths.tolist() == counts
    assert learner.class_tokens.shape[1] == max(counts)
    embedding = model.token_embedding.weight
    for index, word in enumerate(LONG_WORDS.values()):
        ids = tiny_tokenizer(word, add_special_tokens=False).input_ids
        torch.testing.assert_close(learner.class_tokens[index, : len(ids)], embedding[ids])
        assert not learner.class_tokens[index, len(ids):].any()


def test_set_class_words_switches_lengths(tiny_clip_dir, tiny_clip, tiny_tokenizer):
    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "table"], background_words=[])
    assert model.prompt_learner.class_tokens.shape[1] == 1
    sentences = {"cat": "a photo of a {}.", "table": "a photo of a {}."}
    for words in ({"table": "person with clothes,people,human"}, {"table": "dining table", "cat": "feathered friend"},
                  {"table": "table", "cat": "cat"}):
        model.set_class_words(words)
        with torch.no_grad():
            features = model.get_text_features()
        reference = sentence_features(tiny_clip, tiny_tokenizer,
                                      [sentences[n].format(w) for n, w in zip(model.class_names,
                                                                               model.config.class_words)])
        torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
    assert model.prompt_learner.class_token_lengths.tolist() == [1, 1]


def test_learning_moves_every_token_of_a_long_word(tiny_clip_dir):
    torch.manual_seed(0)
    model = long_word_model(tiny_clip_dir)
    pixels = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]])
    start = model.prompt_learner.class_tokens.detach().clone()
    losses = fit_labels(model, pixels, labels, steps=10)
    assert losses[-1] < losses[0] - 0.05
    moved = (model.prompt_learner.class_tokens.detach() - start).abs().sum(-1)
    lengths = model.prompt_learner.class_token_lengths.tolist()
    assert max(lengths) > 1
    for index, used in enumerate(lengths):
        assert (moved[index, :used] > 0).all()  # every token of the word learns
        assert not moved[index, used:].any()  # padding slots never enter a prompt


def test_variable_lengths_round_trip(tiny_clip_dir, tmp_path):
    model = long_word_model(tiny_clip_dir)
    model.set_class_words({"cat": "feathered friend"})
    with torch.no_grad():
        model.prompt_learner.class_tokens.add_(0.1 * torch.randn_like(model.prompt_learner.class_tokens))
    model.save_pretrained(tmp_path / "p")
    loaded = PolePromptModel.from_pretrained(tmp_path / "p")
    assert loaded.config.class_token_length is None
    assert loaded.prompt_learner.class_token_lengths.tolist() == model.prompt_learner.class_token_lengths.tolist()
    pixels = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, atol=0, rtol=0)


def old_file_pixels():
    """The pixels `expected_outputs.safetensors` was computed on (pole_hf 0.1.0, d6936f5)."""
    freq = torch.tensor([0.37, 0.011]).repeat_interleave(3 * 64 * 80)
    return torch.sin(torch.arange(2 * 3 * 64 * 80) * freq).reshape(2, 3, 64, 80)


@pytest.mark.parametrize("folder", ["prompts_v0_1_default", "prompts_v0_1_fixed2_context_adapters"])
def test_prompts_saved_by_0_1_load_identically(folder, tmp_path):
    path = os.path.join(DATA, folder)
    expected = load_file(os.path.join(path, "expected_outputs.safetensors"))
    model = PolePromptModel.from_pretrained(path)
    assert model.config.class_token_length in (1, 2)  # saved explicitly: the old grouping stays
    with torch.no_grad():
        output = model(old_file_pixels())
        torch.testing.assert_close(model.get_text_features(), expected["text_embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(output.logits, expected["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(output.background_logits, expected["background_logits"], atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "again")  # re-saved by this version: the same tensors
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as old, \
            safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as new:
        assert set(old.keys()) == set(new.keys())
        for key in old.keys():
            assert torch.equal(old.get_tensor(key), new.get_tensor(key)), key


def test_config_without_a_length_still_loads_old_tensors(tmp_path):
    # a 0.1.0 prompts file whose config.json lacks class_token_length now means "per class": same prompts
    import json
    import shutil

    shutil.copytree(os.path.join(DATA, "prompts_v0_1_default"), tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    del config["class_token_length"]
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    expected = load_file(str(tmp_path / "p" / "expected_outputs.safetensors"))
    model = PolePromptModel.from_pretrained(tmp_path / "p")
    assert model.config.class_token_length is None
    with torch.no_grad():
        torch.testing.assert_close(model(old_file_pixels()).logits, expected["logits"], atol=1e-5, rtol=0)


def test_first_token_variant_learns_one_vector_per_class(tiny_clip_dir, tiny_tokenizer, tmp_path):
    model = long_word_model(tiny_clip_dir, learnable_tokens="first")
    learner = model.prompt_learner
    assert learner.class_tokens.shape == (3, 1, model.clip.config.text_config.hidden_size)
    for index, word in enumerate(LONG_WORDS.values()):
        ids = tiny_tokenizer(word, add_special_tokens=False).input_ids
        torch.testing.assert_close(learner.class_tokens[index, 0], model.token_embedding.weight[ids[0]])
        assert learner.class_tail_ids[index, : learner.class_tail_lengths[index]].tolist() == ids[1:]
    optimizer = torch.optim.SGD(model.learnable_parameters(), lr=1.0)
    model(torch.randn(2, 3, 32, 32), labels=torch.tensor([[1, 0, 1], [0, 1, 0]])).loss.backward()
    optimizer.step()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_learner.class_tokens"]
    model.save_pretrained(tmp_path / "defo")
    with safe_open(str(tmp_path / "defo" / "model.safetensors"), "pt") as f:
        assert {"prompt_learner.class_tail_ids", "prompt_learner.class_tail_lengths"} <= set(f.keys())
    loaded = PolePromptModel.from_pretrained(tmp_path / "defo")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, atol=0, rtol=0)
    tensors = load_file(str(tmp_path / "defo" / "model.safetensors"))
    tensors["prompt_learner.class_tail_lengths"][2] = 99
    save_file(tensors, str(tmp_path / "defo" / "model.safetensors"))
    with pytest.raises(ValueError, match="class_tail_lengths exceed the .* tail token ids"):
        PolePromptModel.from_pretrained(tmp_path / "defo")



def test_selection_switches_to_a_longer_word_and_keeps_learned_tokens(tiny_clip_dir, tiny_clip, tiny_tokenizer):
    from pole_hf.selection import SelectionResult, WordChoice

    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "table"], background_words=[])
    with torch.no_grad():
        model.prompt_learner.class_tokens[0].add_(0.3)  # a learned-looking cat token
    learned_cat = model.prompt_learner.class_tokens[0, :1].clone()
    long_word = "person with clothes,people,human"
    result = SelectionResult(candidates={"table": ["table", long_word]},
                             choices=[WordChoice(0, "x", "table", long_word, {"table": 0.1, long_word: 0.9})])
    assert result.apply(model) == {"table": long_word}
    slots = len(tiny_tokenizer(long_word, add_special_tokens=False).input_ids)
    assert model.prompt_learner.class_tokens.shape[1] == slots
    torch.testing.assert_close(model.prompt_learner.class_tokens[0, :1], learned_cat, atol=0, rtol=0)
    with torch.no_grad():
        features = model.get_text_features()
    torch.testing.assert_close(features[1], sentence_features(tiny_clip, tiny_tokenizer,
                                                              [f"a photo of a {long_word}."])[0], atol=1e-5, rtol=0)
