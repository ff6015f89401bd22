"""PoleImageProcessor, the model's batched CAMs and the standard `image-segmentation` pipeline on saved prompts."""

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, pipeline

from pole_hf import PoleImageProcessor, PolePromptModel, batched_cams, image_cams


@pytest.mark.parametrize("refine", [False, True])
def test_batched_cams_equal_one_call_per_image(bundled_prompts, random_image, refine):
    # the bundled (trained) prompts: on a random CLIP the maps are flat and min-max amplifies float rounding
    model = bundled_prompts
    processor = PoleImageProcessor.for_model(model)
    # two computation sizes (96x96 twice, 64x112 twice), one image with a predicted target, one with none
    images = [random_image(1, 96, 96), random_image(2, 64, 112), random_image(3, 96, 96), random_image(4, 64, 112)]
    targets = [[2, 0], None, [1], []]
    batched = batched_cams(model, processor, images, targets, batch_size=8, refine=refine)
    for image, target, output in zip(images, targets, batched):
        if target == []:
            assert output.cams.shape == (0, image.height, image.width)
            continue
        single = image_cams(model, processor, image, target, refine=refine)
        assert output.class_indices.tolist() == single.class_indices.tolist()
        torch.testing.assert_close(output.cams, single.cams, atol=1e-5, rtol=0)
        torch.testing.assert_close(output.scores, single.scores, atol=1e-6, rtol=0)


def test_model_batch_is_one_forward_with_padded_targets(tiny_model):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 40)
    output = tiny_model(pixels, class_indices=[[1], [0, 2], None])
    assert output.cams.shape[:2] == output.cam_classes.shape == output.cam_scores.shape
    assert output.cams.shape[0] == 3 and output.cams.shape[-2:] == (4, 5)
    assert output.cam_classes[0, 1] == -1 and output.cam_scores[0, 1] == 0 and output.cams[0, 1].abs().sum() == 0
    for row, target in enumerate([[1], [0, 2]]):
        alone = tiny_model.get_cams(pixels[row: row + 1], target)
        torch.testing.assert_close(output.cams[row, : len(target)], alone.cams[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        tiny_model.get_cams(pixels, [[0], [1]])
    with pytest.raises(ValueError, match="multiples of the 8-pixel patch"):
        tiny_model.get_cams(torch.randn(1, 3, 30, 40), [0])


def test_processor_sizes_batches_and_round_trip(tmp_path, tiny_processor, random_image):
    assert tiny_processor.computation_size(50, 30) == (32, 56)  # ceil to the 8-pixel patch
    assert tiny_processor.computation_size(2000, 1000, max_side=100) == (56, 104)
    batch = tiny_processor([random_image(1, 40, 48), random_image(2, 37, 45)])  # both 40x48 after rounding
    assert list(batch) == ["pixel_values"] and batch["pixel_values"].shape == (2, 3, 40, 48)
    with pytest.raises(ValueError, match="different computation sizes"):
        tiny_processor([random_image(1, 40, 48), random_image(2, 24, 64)])
    with pytest.raises(ValueError, match="scales"):
        tiny_processor.variants(scales=[0])
    tiny_processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, PoleImageProcessor) and loaded.to_dict() == tiny_processor.to_dict()


def test_saving_keeps_the_live_config_and_writes_the_processor(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "standalone", include_base=True)
    assert tiny_model.config.base_subfolder is None  # saving describes the folder, not the live model
    loaded = PolePromptModel.from_pretrained(tmp_path / "standalone")
    assert loaded.config.base_subfolder == "base"
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path / "standalone"), PoleImageProcessor)


def test_a_loaded_model_uses_the_processor_saved_beside_it(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "prompts")
    tuned = PoleImageProcessor.from_pretrained(tmp_path / "prompts")
    tuned.scales, tuned.flip, tuned.bg_power = [1.0, 0.5], True, 2.0
    tuned.save_pretrained(tmp_path / "prompts")
    loaded = PolePromptModel.from_pretrained(tmp_path / "prompts")
    found = PoleImageProcessor.for_model(loaded)
    assert (found.scales, found.flip, found.bg_power) == ([1.0, 0.5], True, 2.0)
    loaded.save_pretrained(tmp_path / "again")  # re-saving keeps the tuned processor
    assert PoleImageProcessor.from_pretrained(tmp_path / "again").to_dict() == tuned.to_dict()


def test_image_segmentation_pipeline_on_saved_prompts(tmp_path, world_prompts, random_image):
    segmenter = pipeline("image-segmentation", model=world_prompts)
    assert isinstance(segmenter.image_processor, PoleImageProcessor)
    image = random_image(5, 40, 56)
    segments = segmenter(image)
    cam = pipeline("pole-cam", model=world_prompts)(image)  # the same processor -> model -> processor
    expected = np.asarray(cam["mask"])
    names = segmenter.model.config.id2label
    assert {s["label"] for s in segments} == {names[int(v)] for v in np.unique(expected)}
    for segment in segments:
        assert segment["mask"].size == (56, 40)
        value = segmenter.model.config.label2id[segment["label"]]
        np.testing.assert_array_equal(np.asarray(segment["mask"]) == 255, expected == value)


def test_iter_cams_keeps_order_windows_and_skips_items_without_targets(bundled_prompts, random_image, monkeypatch):
    import pole_hf.cam_inference as inference

    model = bundled_prompts
    processor = PoleImageProcessor.for_model(model)
    items = [(random_image(1, 96, 96), [2, 0]), (random_image(2, 64, 112), []), (random_image(3, 96, 96), [1]),
             (random_image(4, 64, 112), [0]), (random_image(5, 96, 96), [])]
    calls = []
    real = inference.batched_cams

    def counting(model_, processor_, images, class_indices, **options):
        calls.append(len(images))
        return real(model_, processor_, images, class_indices, **options)

    monkeypatch.setattr(inference, "batched_cams", counting)
    yielded = list(inference.iter_cams(model, processor, iter(items), image=lambda item: item[0],
                                       targets=lambda item: item[1], batch_size=2, window=3))
    assert [item for item, _ in yielded] == items  # input order, every item once
    assert calls == [2, 1]  # windows of 3 items; the target-less ones never reach the model
    for (image, target), (_, output) in zip(items, yielded):
        if not target:
            assert output is None
            continue
        single = image_cams(model, processor, image, target)
        assert output.class_indices.tolist() == target
        torch.testing.assert_close(output.cams, single.cams, atol=1e-5, rtol=0)


def test_get_cams_runs_the_text_tower_once_while_prompts_learn(tiny_model, monkeypatch):
    # training calls get_cams with grad on and trainable prompts: the text features of the CAM pass are returned,
    # not computed a second time
    tiny_model.prompt_learner.class_tokens.requires_grad_(True)
    tiny_model.get_text_features()  # the background prompts' features are cached
    calls = []
    real = type(tiny_model).encode_prompt_embeddings
    monkeypatch.setattr(type(tiny_model), "encode_prompt_embeddings",
                        lambda self, *args: calls.append(1) or real(self, *args))
    with torch.enable_grad():
        output = tiny_model.get_cams(torch.randn(1, 3, 32, 32), [[0, 1]])
    assert len(calls) == 1
    torch.testing.assert_close(output.text_embeds, tiny_model.get_text_features().detach())
