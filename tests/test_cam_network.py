"""PoleCamNetwork: shapes and output stride, CAMs, CLIMS gradients through the masks, per-pair words, saving,
the Hub, the pipeline."""

import numpy as np
import pytest
import torch
from helpers import random_image
from PIL import Image
from transformers import AutoConfig, AutoModel, pipeline

from pole_hf import PoleCamNetwork, PoleCamNetworkConfig, PoleImageProcessor, PolePromptModel, image_cams
from pole_hf.cam_network_objective import CamNetworkObjective, freeze_for_variant, word_text_features
from pole_hf.configuration_pole_cam_network import tiny_resnet_config

CLASSES = ["cat", "dog", "sofa"]


def network(**options):
    torch.manual_seed(0)
    return PoleCamNetwork(PoleCamNetworkConfig(backbone_config=tiny_resnet_config(hidden_sizes=(8, 16, 24, 32),
                                                                                 embedding_size=8),
                                               class_names=CLASSES, **options)).eval()


def image(seed=3, size=(45, 37)):
    return random_image(seed, size[1], size[0])


def test_default_config_builds_resnet50_shape_offline():
    config = PoleCamNetworkConfig()
    assert config.backbone_config.hidden_sizes[-1] == 2048 and config.num_classes == 20
    assert config.cam_scales == [1.0, 0.5, 1.5, 2.0] and config.output_stride == 16


@pytest.mark.parametrize("stride", [16, 32])
def test_shapes_and_output_stride(stride):
    model = network(output_stride=stride)
    out = model(torch.randn(2, 3, 64, 96))
    assert out.logits.shape == (2, 3)
    assert out.class_maps.shape == (2, 3, 64 // stride, 96 // stride)
    assert out.feature_map.shape == (2, 32, 64 // stride, 96 // stride)
    torch.testing.assert_close(out.probability_maps, torch.sigmoid(out.class_maps))
    torch.testing.assert_close(out.logits, out.class_maps.mean((2, 3)), atol=1e-5, rtol=1e-5)  # linear head
    assert model.classifier.bias is None and model.classifier.kernel_size == (1, 1)


def test_stem_is_frozen_and_stays_in_eval():
    model = network(freeze_batch_norm=False).train()
    assert not any(p.requires_grad for p in model.resnet.embedder.parameters())
    assert not model.resnet.embedder.training and model.resnet.encoder.training
    frozen = network().train()
    assert not any(m.training for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d))
    backbone, head = frozen.parameter_groups()
    assert head == [frozen.classifier.weight] and all(p.requires_grad for p in backbone)


def test_multiscale_flip_cams_are_max_normalised_and_flip_symmetric():
    model = network()
    processor = PoleImageProcessor.for_model(model)
    assert processor.variants() == [(s, f) for s in model.config.cam_scales for f in (False, True)]
    assert (processor.cam_merge, processor.background, processor.bg_threshold) == ("max", "threshold", 0.15)
    picture = image().resize((64, 48))
    cams = image_cams(model, processor, picture, [0, 1, 2]).cams
    assert cams.shape == (3, 48, 64) and cams.min() >= 0
    torch.testing.assert_close(cams.flatten(1).amax(1), torch.ones(3), atol=1e-4, rtol=0)  # IRN: max + 1e-5
    mirrored = image_cams(model, processor, picture.transpose(Image.FLIP_LEFT_RIGHT), [0, 1, 2]).cams
    torch.testing.assert_close(mirrored, cams.flip(-1), atol=1e-5, rtol=1e-4)
    single = image_cams(model, processor, picture, [0, 1, 2], scales=[1.0], flip=False).cams
    pixels = processor(picture)["pixel_values"]
    up = torch.nn.functional.interpolate(torch.relu(model(pixels).class_maps), size=(48, 64), mode="bilinear")[0]
    torch.testing.assert_close(single, up / (up.flatten(1).amax(1).view(-1, 1, 1) + 1e-5), atol=1e-5, rtol=1e-4)


def test_save_load_and_auto_classes(tmp_path):
    model = network()
    with torch.no_grad():
        model.classifier.weight.add_(0.1)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "pole_cam_network"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, PoleCamNetwork) and loaded.config.class_names == CLASSES
    assert not any(p.requires_grad for p in loaded.resnet.embedder.parameters())
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(pixels).class_maps, model(pixels).class_maps)


def test_push_to_hub_and_pipeline_from_the_repo(local_hub):
    model = network()
    model.push_to_hub("camnet")
    pipe = pipeline("pole-cam", model=f"{local_hub.user}/camnet")
    assert isinstance(pipe.model, PoleCamNetwork)
    np.testing.assert_allclose(pipe(image(), labels=["dog"])["cams"],
                               pipeline("pole-cam", model=model)(image(), labels=["dog"])["cams"], atol=1e-6)


def test_pipeline_on_the_network_gives_cams_masks_crf_and_overlays():
    model = network()
    pipe = pipeline("pole-cam", model=model)
    out = pipe(image(), labels=["sofa", "cat"], return_overlay=True)
    assert out["labels"] == ["sofa", "cat"] and out["cams"].shape == (2, 37, 45)
    expected = image_cams(model, PoleImageProcessor.for_model(model), image(), [2, 0]).cams.numpy()
    np.testing.assert_allclose(out["cams"], expected, atol=1e-6)
    assert out["mask"].mode == "P" and out["mask"].size == (45, 37) and out["overlay"].size == (45, 37)
    assert set(np.unique(np.asarray(out["mask"]))) <= {0, 1, 3}
    single = pipe(image(), labels=["sofa"], scales=[1.0], flip=False)["cams"]
    assert not np.allclose(single, out["cams"][:1])  # the config's 4 scales + flip unless asked otherwise
    predicted = pipe(image())
    assert predicted["labels"] and len(predicted["scores"]) == len(predicted["labels"])
    pytest.importorskip("pydensecrf.densecrf")
    assert pipe(image(), labels=["cat"], crf=True)["mask"].size == (45, 37)


@pytest.fixture()
def prompt_model(tiny_clip_dir):
    return PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky", "grass"],
                                     template="a photo of {}.", learn_context=True)


def clims_batch(model, seed=0):
    torch.manual_seed(seed)
    pixels = torch.rand(2, 3, 64, 64)
    out = model.train()(pixels)
    return out, pixels


def test_gradients_reach_the_network_through_the_masks_not_clip(prompt_model):
    model = network()
    freeze_for_variant(prompt_model, "clims")
    out, pixels = clims_batch(model)
    losses = CamNetworkObjective()(prompt_model, out.probability_maps, pixels, [[0, 2], [1]])
    losses.loss.backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    deep = model.resnet.encoder.stages[-1].layers[0].layer[0].convolution.weight.grad
    assert deep is not None and deep.abs().sum() > 0
    assert all(p.grad is None for p in model.resnet.embedder.parameters())  # frozen stem
    assert all(p.grad is None for p in prompt_model.clip.parameters())  # frozen CLIP
    assert all(p.grad is None for p in prompt_model.learnable_parameters())  # CLIMS learns no prompt part
    # the network only enters through the masks: the same maps detached give the same loss and no gradient path
    detached = CamNetworkObjective()(prompt_model, out.probability_maps.detach(), pixels, [[0, 2], [1]])
    torch.testing.assert_close(detached.loss, losses.loss)
    assert not detached.loss.requires_grad


def test_variants_train_their_prompt_parts(prompt_model):
    assert freeze_for_variant(prompt_model, "coop") == [prompt_model.prompt_learner.context]
    model = network()
    out, pixels = clims_batch(model)
    CamNetworkObjective()(prompt_model, out.probability_maps, pixels, [[0], [1]]).loss.backward()
    assert prompt_model.prompt_learner.context.grad.abs().sum() > 0
    assert prompt_model.prompt_learner.class_tokens.grad is None
    learned = freeze_for_variant(prompt_model, "defo")
    assert {id(p) for p in learned} == {id(prompt_model.prompt_learner.context),
                                        id(prompt_model.prompt_learner.class_tokens)}


def test_an_untouched_word_prompt_equals_the_class_prompt(prompt_model):
    with torch.no_grad():
        words = word_text_features(prompt_model, CLASSES)
        classes = prompt_model.get_text_features()[: len(CLASSES)]
    torch.testing.assert_close(words, classes, atol=1e-5, rtol=1e-4)


def test_a_pairs_word_changes_its_loss_and_only_its_own(prompt_model):
    model = network()
    out, pixels = clims_batch(model)
    objective = CamNetworkObjective()
    maps, labels = out.probability_maps.detach(), [[0, 2], [1]]
    base = objective(prompt_model, maps, pixels, labels, [["cat", "sofa"], ["dog"]])
    changed = objective(prompt_model, maps, pixels, labels, [["cat", "couch"], ["dog"]])
    official = objective(prompt_model, maps, pixels, labels)
    assert not torch.isclose(base.loss, changed.loss)
    torch.testing.assert_close(base.fg_scores[[0, 2]], changed.fg_scores[[0, 2]])
    assert not torch.isclose(base.fg_scores[1], changed.fg_scores[1])
    torch.testing.assert_close(base.loss, official.loss, atol=1e-5, rtol=1e-5)  # the official names as words
    with pytest.raises(ValueError, match="one word per label"):
        objective(prompt_model, maps, pixels, labels, [["cat"], ["dog"]])


def test_defo_learns_one_vector_per_class_the_words_first_token(tiny_clip_dir):
    # POLE's DeFo (clip_defo_utils.PromptLearner): 3 learned context vectors and one learned vector per class from
    # the name's first token; the name's other tokens stay fixed
    from pole_hf.cam_network_objective import variant_options

    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["dining table", "dog"], background_words=["sky"],
                                      **variant_options("defo"))
    learned = freeze_for_variant(model, "defo")
    first = model.tokenizer("dining table", add_special_tokens=False).input_ids
    assert len(first) > 1, "the test needs a multi-token name"
    assert model.prompt_learner.class_tokens.shape[:2] == (2, 1)
    assert model.prompt_learner.class_tail_ids[0, : len(first) - 1].tolist() == first[1:]
    assert model.prompt_learner.context.shape[0] == 3
    assert {id(p) for p in learned} == {id(model.prompt_learner.context), id(model.prompt_learner.class_tokens)}


@pytest.mark.parametrize(("variant", "context", "tokens"), [
    ("clims", False, "all"), ("coop", True, "all"), ("defo", True, "first"), ("pole", False, "all")])
def test_variant_options_learn_what_the_paper_table_says(variant, context, tokens):
    from pole_hf.cam_network_objective import variant_options

    for adapters in (False, True):
        assert variant_options(variant, use_adapters=adapters) == {
            "template": "a photo of {}.", "learn_context": context, "use_adapters": adapters,
            "learnable_tokens": tokens}
    with pytest.raises(ValueError, match="prompt variant 'clip' is not one of"):
        variant_options("clip")
