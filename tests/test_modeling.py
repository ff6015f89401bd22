"""PolePromptModel: spliced prompts equal CLIP's sentences, caching, gradients, forward and loss."""

import pytest
import torch
import torch.nn.functional as F
from helpers import fit_labels

from pole_hf import PoleConfig, PoleModelOutput, PolePromptModel


def clip_sentence_features(clip, tokenizer, sentences):
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(clip.get_text_features(**inputs).pooler_output, dim=-1)


def test_text_features_equal_clip_sentences(tiny_model, tiny_clip, tiny_tokenizer):
    with torch.no_grad():
        features = tiny_model.get_text_features()
    sentences = [f"a photo of a {w}." for w in ["cat", "dog", "sofa", "grass", "sky", "water"]]
    reference = clip_sentence_features(tiny_clip, tiny_tokenizer, sentences)
    assert features.shape == (6, tiny_clip.config.projection_dim)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(6))


@pytest.mark.parametrize("length", [1, 2, 4])
def test_eos_follows_prompt_length(tiny_clip_dir, tiny_clip, tiny_tokenizer, length):
    # "feathered friend" is two tokens: with >= 2 slots the prompt is exactly the sentence, whatever the slot count
    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "bird"], class_token_length=length,
                                      class_words={"bird": "feathered friend"}, background_words=[])
    with torch.no_grad():
        features = model.get_text_features()
    reference = clip_sentence_features(tiny_clip, tiny_tokenizer,
                                       ["a photo of a cat.", "a photo of a feathered friend."])
    torch.testing.assert_close(features[0], reference[0], atol=1e-5, rtol=0)
    if length >= 2:
        torch.testing.assert_close(features[1], reference[1], atol=1e-5, rtol=0)
    assert model.prompt_learner.class_token_lengths.tolist() == [1, min(2, length)]


def test_fixed_length_averages_a_longer_word(tiny_clip_dir, tiny_clip, tiny_tokenizer):
    # the explicit class_token_length option keeps 0.1.0's grouping (it changes the prompt)
    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["table"], class_words=["dining table"],
                                      background_words=[], class_token_length=1)
    ids = tiny_tokenizer("dining table", add_special_tokens=False).input_ids
    assert len(ids) == 2
    expected = tiny_clip.text_model.embeddings.token_embedding.weight[ids].mean(0)
    torch.testing.assert_close(model.prompt_learner.class_tokens[0, 0], expected)


def test_learned_context_starts_as_the_template(tiny_clip_dir, tiny_clip, tiny_tokenizer):
    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat"], learn_context=True, background_words=[])
    assert model.prompt_learner.context.shape == (4, tiny_clip.config.text_config.hidden_size)  # "a photo of a"
    with torch.no_grad():
        features = model.get_text_features()
    torch.testing.assert_close(features[0], clip_sentence_features(tiny_clip, tiny_tokenizer,
                                                                   ["a photo of a cat."])[0], atol=1e-5, rtol=0)
    assert {n for n, _ in model.named_parameters() if not n.startswith("clip.")} == {
        "prompt_learner.class_tokens", "prompt_learner.context"}


def test_text_feature_cache_follows_changes(tiny_model, tiny_clip, tiny_tokenizer):
    with torch.no_grad():
        first = tiny_model.get_text_features()
        assert tiny_model.get_text_features() is first
    optimizer = torch.optim.SGD(tiny_model.learnable_parameters(), lr=1.0)
    loss = tiny_model.get_text_features()[:3].sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after_step = tiny_model.get_text_features()
    assert not torch.allclose(after_step[:3], first[:3])
    torch.testing.assert_close(after_step[3:], first[3:])  # background prompts never change
    tiny_model.set_class_words({"sofa": "couch"})
    assert tiny_model.config.class_words == ["cat", "dog", "couch"]
    with torch.no_grad():
        after_words = tiny_model.get_text_features()
    reference = clip_sentence_features(tiny_clip, tiny_tokenizer, ["a photo of a couch."])[0]
    torch.testing.assert_close(after_words[2], reference, atol=1e-5, rtol=0)


def test_set_class_words_rejects_unknown_class(tiny_model):
    with pytest.raises(ValueError, match=r"unknown classes \['horse'\]; known classes"):
        tiny_model.set_class_words({"horse": "pony"})


def test_only_prompts_get_gradients_and_clip_stays_in_eval(tiny_model):
    tiny_model.train()
    assert tiny_model.prompt_learner.training and not tiny_model.clip.training
    assert not any(m.training for m in tiny_model.clip.modules())
    output = tiny_model(torch.randn(2, 3, 32, 48), labels=torch.tensor([[1, 0, 1], [0, 1, 0]]))
    output.loss.backward()
    assert all(p.grad is None for p in tiny_model.clip.parameters())
    grad = tiny_model.prompt_learner.class_tokens.grad
    assert grad is not None and grad.abs().sum() > 0


def test_forward_outputs_and_loss_decreases(tiny_model):
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    output = tiny_model(pixels, labels=labels)
    assert isinstance(output, PoleModelOutput)
    assert output.logits.shape == (4, 3) and output.background_logits.shape == (4, 3)
    assert output.image_embeds.shape == (4, tiny_model.clip.config.projection_dim)
    losses = fit_labels(tiny_model, pixels, labels, steps=15)
    assert losses[-1] < losses[0] - 0.05
    assert isinstance(tiny_model(pixels, return_dict=False), tuple)


def test_image_feature_options(tiny_clip_dir, tiny_clip):
    pixels = torch.randn(1, 3, 32, 32)
    pooled = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat"], image_feature="pooled")
    with torch.no_grad():
        reference = F.normalize(tiny_clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        torch.testing.assert_close(pooled.get_image_features(pixels), reference, atol=1e-5, rtol=0)
        mean = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat"])
        tokens = tiny_clip.vision_model(pixel_values=pixels).last_hidden_state
        manual = tiny_clip.visual_projection(tiny_clip.vision_model.post_layernorm(tokens[:, 1:]).mean(1))
        torch.testing.assert_close(mean.get_image_features(pixels), F.normalize(manual, dim=-1), atol=1e-5, rtol=0)
        # any size that is a multiple of the patch: position embeddings are interpolated
        assert mean.get_image_features(torch.randn(1, 3, 40, 64)).shape == (1, tiny_clip.config.projection_dim)


def test_adapters_are_learnable_and_start_near_identity(tiny_clip_dir):
    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "dog"], use_adapters=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual_adapter.ratio" in names and "text_adapter.fc.0.weight" in names
    torch.testing.assert_close(model.visual_adapter.ratio, torch.full_like(model.visual_adapter.ratio, 0.2))


def test_model_from_config_alone(tiny_clip_dir, tiny_clip):
    config = PoleConfig(base_model_name_or_path=tiny_clip_dir, clip_config=tiny_clip.config.to_dict(),
                        class_names=["cat", "dog"], background_words=["sky"])
    model = PolePromptModel(config)
    assert model.prompt_learner.class_tokens.shape == (2, 1, tiny_clip.config.text_config.hidden_size)
    assert model.tokenizer is not None and model.prompt_learner.prefix_ids[0] == model.tokenizer.bos_token_id


def test_config_without_clip_config_is_refused():
    with pytest.raises(ValueError, match="no clip_config"):
        PolePromptModel(PoleConfig(class_names=["cat"]))
