"""Behaviours a mutation run of the CAM modules found unpinned (issue #17): target resolution and padding, the
GradCAM engine's defaults, scores, batching and CAA layer count, the CLIP internals, the inference loop, the
processor and the two CAM models. Hand computations on tiny tensors, round trips and boundary sizes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import eager_attention

from pole_hf.cam import gradcam, padded_targets, resolve_targets

# --- target resolution and padding (pole_hf.cam) ---


def test_resolve_targets_reads_a_flat_list_for_one_image_and_nested_lists_otherwise():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    assert resolve_targets([2, 0], probs, 0.5) == [[2, 0]]
    assert resolve_targets([[2, 0]], probs, 0.5) == [[2, 0]]
    two = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert resolve_targets([None, [2]], two, 0.5) == [[1], [2]]
    assert resolve_targets(None, two, 0.5) == [[1], [0]]
    with pytest.raises(ValueError, match="1 entries for a batch of 2"):
        resolve_targets([[0]], two, 0.5)


def test_resolve_targets_threshold_is_inclusive_unless_told_and_falls_back_to_the_argmax():
    probs = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]], dtype=torch.float64)
    assert resolve_targets(None, probs, 0.25) == [[0, 1, 2], [1, 2]]
    assert resolve_targets(None, probs, 0.25, inclusive=False) == [[1], [1, 2]]
    assert resolve_targets(None, probs, 0.5, inclusive=False) == [[1], [2]]  # none above: the most likely one
    assert resolve_targets(None, torch.tensor([[0.1, 0.2, 0.7]]), 0.9) == [[2]]


def test_resolve_targets_accepts_the_first_and_last_class_only():
    probs = torch.full((1, 3), 1 / 3)
    assert resolve_targets([0, 2], probs, 0.5) == [[0, 2]]
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"class indices \[{bad}\] are out of range for 3 classes"):
            resolve_targets([[1, bad]], probs, 0.5)


def test_padded_targets_fill_minus_one_and_keep_empty_batches_empty():
    classes = padded_targets([[2, 0], [], [1]])
    assert classes.dtype == torch.long
    assert classes.tolist() == [[2, 0], [-1, -1], [1, -1]]
    assert padded_targets([]).shape == (0, 0)
    assert padded_targets([[], []]).shape == (2, 0)


# --- the GradCAM engine (pole_hf.cam.gradcam) ---


def hand_scores(logits: torch.Tensor, targets: list[int], num_classes: int) -> torch.Tensor:
    """Softmax of one image's logits over its targets and the background words, read at the targets."""
    allowed = list(targets) + list(range(num_classes, logits.shape[-1]))
    return logits[allowed].softmax(-1)[: len(targets)]


def test_gradcam_defaults_are_plain_clip_es_cams(tiny_model):
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, 32, 40)
    default = gradcam(tiny_model, pixels, [[0, 1]])
    explicit = gradcam(tiny_model, pixels, [[0, 1]], refine=False, position_embedding="clip_es")
    torch.testing.assert_close(default.cams, explicit.cams, atol=0, rtol=0)
    bicubic = gradcam(tiny_model, pixels, [[0, 1]], position_embedding="bicubic")
    assert not torch.allclose(default.cams, bicubic.cams, atol=1e-3)
    refined = gradcam(tiny_model, pixels, [[0, 1]], refine=True)
    assert not torch.allclose(default.cams, refined.cams, atol=1e-3)
    torch.testing.assert_close(refined.cams, gradcam(tiny_model, pixels, [[0, 1]], refine=True,
                                                     box_edges="clip_es").cams, atol=0, rtol=0)


def test_gradcam_batch_scores_padding_and_class_zero_by_hand(tiny_model):
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 32, 40)
    targets = [[0, 2], [1], [0]]
    out = gradcam(tiny_model, pixels, targets)
    num_classes = tiny_model.config.num_classes
    assert out.cam_classes.tolist() == [[0, 2], [1, -1], [0, -1]]
    assert out.cams.shape == (3, 2, 4, 5)
    for row, chosen in enumerate(targets):
        torch.testing.assert_close(out.cam_scores[row, : len(chosen)],
                                   hand_scores(out.logits[row].float(), chosen, num_classes), atol=1e-6, rtol=0)
        alone = gradcam(tiny_model, pixels[row: row + 1], [chosen])
        torch.testing.assert_close(out.cams[row, : len(chosen)], alone.cams[0], atol=1e-5, rtol=0)
        assert torch.allclose(out.cams[row, : len(chosen)].amax((1, 2)), torch.ones(len(chosen)))
    assert out.cam_scores[1, 1] == 0 and out.cam_scores[2, 1] == 0
    assert out.cams[1, 1].abs().sum() == 0 and out.cams[2, 1].abs().sum() == 0
    # the softmax takes every background word: the scores of one target and the background words sum to 1
    assert 0 < out.cam_scores[2, 0] < 1


def test_gradcam_images_without_targets(tiny_model):
    pixels = torch.randn(2, 3, 24, 32)
    empty = gradcam(tiny_model, pixels, [[], []])
    assert empty.cams.shape == (2, 0, 3, 4) and empty.cams.dtype == torch.float32
    assert empty.cam_classes.shape == empty.cam_scores.shape == (2, 0)
    mixed = gradcam(tiny_model, pixels, [[], [1]], refine=True)
    alone = gradcam(tiny_model, pixels[1:], [[1]], refine=True)
    assert mixed.cam_classes.tolist() == [[-1], [1]] and mixed.cams[0].abs().sum() == 0
    torch.testing.assert_close(mixed.cams[1], alone.cams[0], atol=1e-5, rtol=0)


def test_gradcam_refuses_a_width_off_the_patch_grid(tiny_model):
    with pytest.raises(ValueError, match="32x36 are not multiples of the 8-pixel patch"):
        gradcam(tiny_model, torch.randn(1, 3, 32, 36), [[0]])
    with pytest.raises(ValueError, match="36x32 are not multiples"):
        gradcam(tiny_model, torch.randn(1, 3, 36, 32), [[0]])


@pytest.mark.parametrize("caa_layers", [1, 2, 5])
def test_caa_uses_the_last_caa_layers_blocks(tiny_model, caa_layers):
    from pole_hf.caa import affinity_from_attention, refine_with_affinity

    torch.manual_seed(5)
    pixels = torch.randn(1, 3, 32, 40)
    probs, _ = eager_attention(tiny_model.clip, pixels)  # the tiny CLIP has 2 blocks: 5 means both
    raw = gradcam(tiny_model, pixels, [[0, 2]], position_embedding="bicubic").cams[0]
    refined = gradcam(tiny_model, pixels, [[0, 2]], refine=True, caa_layers=caa_layers,
                      position_embedding="bicubic").cams[0]
    affinity = affinity_from_attention(torch.stack(probs[-caa_layers:]).mean(0)[1:, 1:])
    torch.testing.assert_close(refined, refine_with_affinity(raw, affinity), atol=1e-4, rtol=0)


# --- the inference loop (pole_hf.cam_inference) ---


class RecordingCamModel(torch.nn.Module):
    """A CAM model stand-in whose parameter lives on the meta device: it records each `get_cams` call's batch size
    and pixel device, and returns one constant map per target (class 0 predicted when none is given)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.calls = []

    def get_cams(self, pixel_values, class_indices, **options):
        self.calls.append((len(pixel_values), pixel_values.device.type, tuple(pixel_values.shape[-2:])))
        targets = [[0] if t is None else list(t) for t in class_indices]
        slots = max(len(t) for t in targets)
        classes = padded_targets(targets)
        grid = (pixel_values.shape[-2] // 8, pixel_values.shape[-1] // 8)
        cams = (classes >= 0).float()[:, :, None, None].expand(-1, -1, *grid).clone()
        return type("Out", (), {"cams": cams, "cam_classes": classes, "cam_scores": torch.ones(len(targets), slots)})


def test_batched_cams_moves_the_pixels_to_the_model_device(tiny_processor, random_image):
    from pole_hf import batched_cams

    model = RecordingCamModel()  # its parameter is on the meta device; its maps come back on the CPU
    outputs = batched_cams(model, tiny_processor, [random_image(0, 16, 16)], [[0]])
    assert model.calls == [(1, "meta", (16, 16))] and outputs[0].cams.shape == (1, 16, 16)


def test_batched_cams_default_batch_size_is_8(tiny_processor, random_image, monkeypatch):
    from pole_hf import batched_cams

    model = RecordingCamModel()
    monkeypatch.setattr("pole_hf.cam_inference._device", lambda m: torch.device("cpu"))
    outputs = batched_cams(model, tiny_processor, [random_image(i, 16, 16) for i in range(9)], [[1]] * 9)
    assert [c[0] for c in model.calls] == [8, 1] and len(outputs) == 9
    assert all(o.class_indices.tolist() == [1] and o.cams.shape == (1, 16, 16) for o in outputs)


def test_image_cams_is_one_image_of_batch_one(tiny_processor, random_image, monkeypatch):
    from pole_hf import image_cams

    model = RecordingCamModel()
    monkeypatch.setattr("pole_hf.cam_inference._device", lambda m: torch.device("cpu"))
    out = image_cams(model, tiny_processor, random_image(0, 16, 24), [2], max_side=16)
    assert model.calls == [(1, "cpu", (16, 16))]  # 24 x 16 capped at 16 x 10.7, rounded up to the 8-pixel patch
    assert out.cams.shape == (1, 16, 24)


def test_size_buckets_use_the_given_longer_side_cap(tiny_processor, random_image):
    from pole_hf.cam_inference import size_buckets

    images = [random_image(0, 200, 400), random_image(1, 190, 400)]  # 200 x 400 and 192 x 400 at the default cap
    assert size_buckets(tiny_processor, images) == {(200, 400): [0], (192, 400): [1]}
    assert size_buckets(tiny_processor, images, max_side=64) == {(32, 64): [0, 1]}  # 32 and 30.4 -> 32


def test_iter_cams_default_window_is_four_default_batches(tiny_processor, monkeypatch):
    import pole_hf.cam_inference as inference

    calls = []
    monkeypatch.setattr(inference, "batched_cams", lambda model, processor, images, targets, batch_size, **o:
                        calls.append((len(images), batch_size)) or [None] * len(images))
    items = list(range(33))
    yielded = list(inference.iter_cams(None, tiny_processor, items, image=lambda i: i, targets=lambda i: [0]))
    assert calls == [(32, 8), (1, 8)] and [item for item, _ in yielded] == items


# --- the processor (pole_hf.image_processing_pole) ---


def grid_output(cams, classes):
    """A model output stand-in: `cams [B, K, h, w]`, `cam_classes [B, K]`, scores 1 for the real slots."""
    classes = torch.as_tensor(classes)
    return type("Out", (), {"cams": torch.as_tensor(cams, dtype=torch.float32), "cam_classes": classes,
                            "cam_scores": (classes >= 0).float()})


def test_semantic_segmentation_unflips_the_flipped_outputs(tiny_processor):
    plain = grid_output([[[[0.9, 0.1]]]], [[1]])
    mirrored = grid_output([[[[0.9, 0.1]]]], [[1]])  # declared flipped: it reads [0.1, 0.9]
    options = {"background": "threshold", "bg_threshold": 0.6}
    same = tiny_processor.post_process_semantic_segmentation([plain, mirrored], **options)
    assert same[0].tolist() == [[2, 0]]  # mean [0.9, 0.1]: class 1 (value 2), then background
    merged = tiny_processor.post_process_semantic_segmentation([plain, mirrored], flips=[False, True], **options)
    assert merged[0].tolist() == [[0, 0]] and merged[0].dtype == torch.long  # mean [0.5, 0.5] < 0.6


# --- the CAM network (pole_hf.modeling_pole_cam_network) ---


def test_cam_network_forward_with_a_tuple_returning_backbone_config():
    from test_cam_network import network

    model = network()
    model.resnet.config.return_dict = False  # the backbone's own default output is then a tuple
    out = model(torch.randn(1, 3, 32, 32))
    assert out.class_maps.shape == (1, 3, 2, 2) and out.feature_map.shape == (1, 32, 2, 2)


def test_preprocess_honours_return_tensors(tiny_processor, random_image):
    import numpy as np

    batch = tiny_processor(random_image(0, 16, 24), return_tensors="np")
    assert isinstance(batch["pixel_values"], np.ndarray) and batch["pixel_values"].shape == (1, 3, 16, 24)


def test_max_merge_divides_by_the_peak_plus_1e_5():
    from pole_hf import PoleImageProcessor

    processor = PoleImageProcessor(patch_size=1, cam_merge="max")
    out = grid_output([[[[1.0, 0.5]]]], [[0]])
    merged = processor.post_process_cams([out, out])[0].cams  # sum [2, 1], divided by 2 + 1e-5
    torch.testing.assert_close(merged, torch.tensor([[[2 / (2 + 1e-5), 1 / (2 + 1e-5)]]]), atol=0, rtol=1e-7)
    assert merged.max() < 1


def test_segment_takes_the_given_background_rule(tiny_processor):
    from pole_hf.cam import CamOutput

    cams = CamOutput(cams=torch.tensor([[[0.4, 0.8]]]), class_indices=torch.tensor([2]))
    assert tiny_processor.segment([cams])[0].tolist() == [[0, 3]]  # power rule: background 0.6 and 0.2
    assert tiny_processor.segment([cams], background="threshold", bg_threshold=0.3)[0].tolist() == [[3, 3]]
    assert tiny_processor.segment([cams], background="threshold")[0].tolist() == [[0, 3]]  # default 0.5
    assert tiny_processor.segment([cams], bg_power=2.0)[0].tolist() == [[3, 3]]  # 0.36 and 0.04


def test_crf_segment_takes_the_given_background_rule(tiny_processor):
    pytest.importorskip("pydensecrf.densecrf", reason="optional extra pole_hf[crf] (pydensecrf2) not installed")
    import numpy as np

    from pole_hf.cam import CamOutput

    image = np.full((8, 8, 3), 128, np.uint8)
    cams = CamOutput(cams=torch.full((1, 8, 8), 0.8), class_indices=torch.tensor([0]))
    power = tiny_processor.segment([cams], [image], crf=True, ignore_below=0.0)[0]  # background 0.2: class 0 wins
    threshold = tiny_processor.segment([cams], [image], crf=True, ignore_below=0.0, background="threshold",
                                       bg_threshold=0.9)[0]
    assert (power == 1).all() and (threshold == 0).all()


# --- the prompt model (pole_hf.modeling_pole) ---


def test_multilabel_softmax_loss_by_hand():
    from pole_hf.modeling_pole import multilabel_softmax_loss

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5], [0.0, 1.0, 0.0, 2.0, -1.0], [1.0, 3.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    log_p = logits.log_softmax(-1)
    # two labels share the target evenly; no label targets the two background words evenly; one label all of it
    expected = -((log_p[0, 0] + log_p[0, 2]) / 2 + (log_p[1, 3] + log_p[1, 4]) / 2 + log_p[2, 1]) / 3
    torch.testing.assert_close(multilabel_softmax_loss(logits, labels), expected)
    # without background words an unlabelled image is skipped; with none labelled the loss is a zero
    torch.testing.assert_close(multilabel_softmax_loss(logits[:, :3], labels),
                               -((logits[0, :3].log_softmax(-1)[[0, 2]].mean()) + logits[2, :3].log_softmax(-1)[1]) / 2)
    assert multilabel_softmax_loss(logits[1:2, :3], labels[1:2]).item() == 0


def test_forward_with_labels_and_cams_targets_the_labels_and_passes_cam_options(tiny_model):
    torch.manual_seed(6)
    pixels = torch.randn(2, 3, 32, 40)
    labels = torch.tensor([[0, 1, 1], [1, 0, 0]])
    out = tiny_model(pixels, labels=labels, output_cams=True, refine=True)
    assert out.cam_classes.tolist() == [[1, 2], [0, -1]] and out.loss is not None
    refined = tiny_model.get_cams(pixels, [[1, 2], [0]], refine=True)
    torch.testing.assert_close(out.cams, refined.cams, atol=1e-5, rtol=0)
    assert not torch.allclose(out.cams, tiny_model.get_cams(pixels, [[1, 2], [0]]).cams, atol=1e-3)


# --- the CAM network, continued ---


def test_cam_network_loss_is_the_multilabel_soft_margin_by_hand():
    from test_cam_network import network

    model = network()
    pixels = torch.randn(2, 3, 32, 32)
    assert model(pixels).loss is None
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float64)
    out = model(pixels, labels=labels)
    x, y = out.logits, labels.float()
    expected = -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean(1).mean()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected)
    as_tuple = model(pixels, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss)
    assert type(model(pixels, return_dict=True)).__name__ == "PoleCamNetworkOutput"


def test_cam_network_last_stage_alone_keeps_its_resolution():
    from test_cam_network import network

    model = network()
    states = model.resnet(torch.randn(1, 3, 64, 64), output_hidden_states=True).hidden_states
    assert [s.shape[-1] for s in states] == [16, 16, 8, 4, 4]  # stem /4, stages 1, 2, 2, then 1 (output stride 16)
    assert [network(output_stride=32).resnet(torch.randn(1, 3, 64, 64), output_hidden_states=True)
            .hidden_states[-1].shape[-1]] == [2]


def test_cam_network_train_keeps_the_stem_trainable_when_not_frozen():
    from test_cam_network import network

    model = network(freeze_stem=False, freeze_batch_norm=False).train()
    assert model.resnet.embedder.training and all(m.training for m in model.modules())
    assert not any(m.training for m in model.train(False).modules())


def test_get_cams_passes_caa_layers_and_returns_both_logit_parts(tiny_model):
    torch.manual_seed(7)
    pixels = torch.randn(1, 3, 32, 40)
    one = tiny_model.get_cams(pixels, [[0, 2]], refine=True, caa_layers=1).cams
    two = tiny_model.get_cams(pixels, [[0, 2]], refine=True, caa_layers=2).cams
    assert not torch.allclose(one, two, atol=1e-3)
    cam_pass = tiny_model.get_cams(pixels, [[0]], position_embedding="bicubic")
    scoring = tiny_model(pixels, output_cams=False)  # the same bicubic positions: the same scores
    torch.testing.assert_close(cam_pass.logits, scoring.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(cam_pass.background_logits, scoring.background_logits, atol=1e-4, rtol=0)
    assert cam_pass.logits.shape == (1, 3) and cam_pass.background_logits.shape == (1, 3)


# --- the CLIP internals (pole_hf._clip_internals) ---


def test_internals_rebuild_the_vision_forward_of_a_three_block_clip(tiny_clip):
    from transformers import CLIPVisionModel

    from pole_hf import _clip_internals as internals
    from pole_hf._last_block_backward import attention_backward, last_block_forward

    config = tiny_clip.config.vision_config.__class__(**{**tiny_clip.config.vision_config.to_dict(),
                                                         "num_hidden_layers": 3})
    torch.manual_seed(8)
    vision = CLIPVisionModel(config).eval()  # what CLIPModel.vision_model is
    pixels = torch.randn(2, 3, 24, 32)
    expected = vision(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    attn = vision.encoder.layers[2].self_attn
    for caa_layers in (0, 2, 3):
        hidden, attention = internals.vision_prefix(vision, pixels, caa_layers, "bicubic")
        state = last_block_forward(vision, hidden)
        torch.testing.assert_close(state.tokens, expected, atol=1e-5, rtol=0)
        assert (attention is None) == (caa_layers == 0)
    # the last block's own attention, from the backward's head loop: softmax(q k^T * scale) averaged over the heads
    _, probs = attention_backward(attn, state, torch.zeros(1, *state.q.shape), attention=True)
    heads = [x.view(2, -1, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (state.q, state.k)]
    torch.testing.assert_close(probs, (heads[0] @ heads[1].transpose(-1, -2) * attn.scale).softmax(-1).mean(1))
    assert attention_backward(attn, state, torch.zeros(1, *state.q.shape), attention=False)[1] is None


def test_vision_tokens_and_image_head_defaults(tiny_model):
    from pole_hf import _clip_internals as internals

    clip = tiny_model.clip
    pixels = torch.randn(1, 3, 24, 32)
    torch.testing.assert_close(internals.vision_tokens(clip.vision_model, pixels),
                               internals.vision_tokens(clip.vision_model, pixels, "clip_es"), atol=0, rtol=0)
    tokens = torch.randn(2, 13, clip.config.vision_config.hidden_size)
    by_hand = clip.visual_projection(clip.vision_model.post_layernorm(tokens[:, 1:]).mean(1))
    torch.testing.assert_close(internals.image_head(clip, tokens), by_hand)
    torch.testing.assert_close(internals.image_head(clip, tokens, "pooled"),
                               clip.visual_projection(clip.vision_model.post_layernorm(tokens[:, 0])))


def test_for_model_of_an_uncached_hub_name_and_of_a_base_without_processor(tiny_model, monkeypatch):
    from pole_hf import PoleImageProcessor

    tiny_model.config.name_or_path = "nobody/absent-prompts"  # offline and not cached: the base CLIP's processor
    assert PoleImageProcessor.for_model(tiny_model).patch_size == 8
    monkeypatch.setattr("pole_hf.image_processing_pole.base_image_processor", lambda config, saved=None: None)
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    plain = PoleImageProcessor.for_model(tiny_model)
    assert (plain.image_mean, plain.image_std) == (list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD))


def test_text_feature_cache_keeps_one_entry_per_part(tiny_model):
    with torch.no_grad():
        first = tiny_model.get_text_features()
        tiny_model.prompt_learner.class_tokens.add_(0.5)
        tiny_model.prompt_learner.background_ids.copy_(tiny_model.prompt_learner.background_ids)  # a new version
        second = tiny_model.get_text_features()
        assert tiny_model.get_text_features() is second  # cached while nothing changes
    assert sorted(key[0] for key in tiny_model._text_cache) == ["all", "background"]
    assert not torch.allclose(first[:3], second[:3]) and torch.allclose(first[3:], second[3:])


def test_for_model_reads_the_processor_saved_in_a_hub_repo(local_hub, tiny_model):
    from pole_hf import PoleImageProcessor, PolePromptModel

    tiny_model.push_to_hub("prompts")
    tuned = PoleImageProcessor.for_model(tiny_model)
    tuned.scales, tuned.flip = [1.0, 0.5], True
    tuned.push_to_hub(f"{local_hub.user}/prompts")
    loaded = PolePromptModel.from_pretrained(f"{local_hub.user}/prompts")  # name_or_path: a Hub id, not a folder
    found = PoleImageProcessor.for_model(loaded)
    assert (found.scales, found.flip) == ([1.0, 0.5], True)


def test_standardized_matches_layer_norm_where_eps_matters():
    from pole_hf._last_block_backward import standardized

    norm = torch.nn.LayerNorm(16, eps=1e-5)
    torch.manual_seed(0)
    x = torch.randn(3, 16) * 3e-3  # variance ~1e-5: eps counts
    hat, rstd = standardized(x, norm)
    torch.testing.assert_close(hat, F.layer_norm(x, (16,), eps=1e-5), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rstd, 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5))


def test_written_out_backward_with_trained_layer_norms_and_on_the_models_device(tiny_clip):
    """Non-unit layer-norm scales (a fresh CLIP's are all 1) and the meta device standing in for a GPU."""
    import copy

    from pole_hf._clip_internals import pool_tokens, vision_prefix
    from pole_hf._last_block_backward import LastBlockState, gradcam_weights, last_block_forward

    clip = copy.deepcopy(tiny_clip)
    vision = clip.vision_model
    torch.manual_seed(5)
    with torch.no_grad():
        for module in vision.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_(0, 0.1)
    hidden, _ = vision_prefix(vision, torch.randn(1, 3, 24, 32))
    layer = vision.encoder.layers[-1]
    grads = torch.randn(2, 1, vision.config.hidden_size)
    state = last_block_forward(vision, hidden)
    weights, probs = gradcam_weights(vision, state, grads, "patch_mean")
    assert probs is None  # no attention unless asked
    leaf = layer.layer_norm1(hidden).detach().requires_grad_(True)
    hook = layer.layer_norm1.register_forward_hook(lambda module, inputs, output: leaf)
    try:
        with torch.enable_grad():
            pooled = pool_tokens(clip, layer(hidden, None), "patch_mean")
            expected = torch.stack([torch.autograd.grad(pooled, leaf, g, retain_graph=True)[0][:, 1:].mean(1)
                                    for g in grads])
    finally:
        hook.remove()
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-4)
    meta_vision = copy.deepcopy(vision).to("meta")
    meta_state = LastBlockState(**{name: value.to("meta") for name, value in vars(state).items()})
    for kind in ("patch_mean", "pooled"):
        meta_weights, meta_probs = gradcam_weights(meta_vision, meta_state, grads.to("meta"), kind, attention=True)
        assert meta_weights.device.type == meta_probs.device.type == "meta"
        assert meta_weights.shape == (2, 1, vision.config.hidden_size) and meta_probs.shape == (1, 13, 13)


def test_gradcam_scores_use_the_configured_image_feature(tiny_model):
    import copy

    from pole_hf._clip_internals import vision_output_tokens

    model = copy.deepcopy(tiny_model)
    model.config.image_feature = "pooled"
    pixels = torch.randn(1, 3, 24, 32)
    out = model.get_cams(pixels, [[1]], position_embedding="bicubic")
    with torch.no_grad():
        features = F.normalize(model.image_features_from_tokens(vision_output_tokens(model.clip, pixels), "pooled"),
                               dim=-1)
        expected = model.get_logit_scale() * features @ model.get_text_features().t()
    torch.testing.assert_close(out.logits, expected[:, : out.logits.shape[1]], atol=1e-5, rtol=1e-5)


def test_cams_of_a_bfloat16_clip_with_float32_adapters(tiny_clip_dir):
    from pole_hf import PolePromptModel

    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "dog", "sofa"], background_words=["sky"],
                                      use_adapters=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for adapter in (model.visual_adapter, model.text_adapter):
            for parameter in adapter.parameters():
                parameter.normal_(0, 0.3)
    pixels = torch.randn(1, 3, 32, 40)
    full = model.get_cams(pixels, [[0, 2]], refine=True)
    model.clip.to(torch.bfloat16)
    assert next(model.visual_adapter.parameters()).dtype == torch.float32
    half = model.get_cams(pixels, [[0, 2]], refine=True)
    assert half.cams.dtype == torch.float32 and half.cams.shape == full.cams.shape
    assert torch.isfinite(half.cams).all() and 0 <= half.cams.min() and half.cams.max() <= 1
    assert (half.cams - full.cams).abs().mean() < 0.1  # bfloat16 rounding, same maps
    torch.testing.assert_close(half.cam_scores, full.cam_scores, atol=0.05, rtol=0)


def test_gradcam_image_embeds_are_the_normalised_features(tiny_model):
    from pole_hf._clip_internals import vision_output_tokens

    pixels = torch.randn(2, 3, 24, 32)
    out = tiny_model.get_cams(pixels, [[0], [1, 2]], position_embedding="bicubic")
    with torch.no_grad():
        expected = F.normalize(tiny_model.image_features_from_tokens(vision_output_tokens(tiny_model.clip, pixels)),
                               dim=-1)
    torch.testing.assert_close(out.image_embeds, expected, atol=1e-5, rtol=1e-5)


def test_padded_slots_allow_no_class_when_there_are_no_background_words(tiny_clip_dir):
    """A padded slot (-1) must not open the softmax to the last column, a class when no background words follow."""
    from pole_hf import PolePromptModel

    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "dog", "sofa"], background_words=[])
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, 24, 32)
    batched = model.get_cams(pixels, [[0, 1], [1]])
    alone = model.get_cams(pixels[1:], [[1]])
    torch.testing.assert_close(batched.cam_scores[1, :1], alone.cam_scores[0], atol=1e-6, rtol=0)
    assert batched.cam_scores[1, 0] == pytest.approx(1.0)  # the only class in its softmax


def test_box_edges_reach_the_refinement(tiny_model):
    from helpers import eager_attention

    from pole_hf.caa import affinity_from_attention, refine_with_affinity

    clip = tiny_model.clip
    torch.manual_seed(6)
    pixels = torch.randn(1, 3, 40, 48)
    probs, _ = eager_attention(clip, pixels)
    affinity = affinity_from_attention(torch.stack(probs[-8:]).mean(0)[1:, 1:])
    raw = tiny_model.get_cams(pixels, [[0, 2]], position_embedding="bicubic").cams[0]
    full = tiny_model.get_cams(pixels, [[0, 2]], refine=True, box_edges="full", position_embedding="bicubic").cams[0]
    torch.testing.assert_close(full, refine_with_affinity(raw, affinity, box_edges="full"), atol=1e-4, rtol=0)
    assert not torch.allclose(full, refine_with_affinity(raw, affinity, box_edges="clip_es"), atol=1e-3)


def test_pool_tokens_defaults_to_the_patch_mean(tiny_clip):
    from pole_hf import _clip_internals as internals

    tokens = torch.randn(2, 13, tiny_clip.config.vision_config.hidden_size)
    torch.testing.assert_close(internals.pool_tokens(tiny_clip, tokens),
                               tiny_clip.vision_model.post_layernorm(tokens[:, 1:]).mean(1))


def test_batched_and_streamed_cams_pass_the_cam_options_and_bucket_at_max_side(tiny_model, tiny_processor):
    import numpy as np
    from PIL import Image

    from pole_hf import batched_cams, iter_cams

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 64), (60, 80))]
    plain = batched_cams(tiny_model, tiny_processor, images, [[0], [2]])
    refined = batched_cams(tiny_model, tiny_processor, images, [[0], [2]], refine=True)
    streamed = [out for _, out in iter_cams(tiny_model, tiny_processor, [0, 1], image=lambda i: images[i],
                                            targets=lambda i: [[0], [2]][i], refine=True)]
    for a, b, c in zip(plain, refined, streamed):
        assert not torch.allclose(a.cams, b.cams, atol=1e-3)
        torch.testing.assert_close(c.cams, b.cams)
    calls = []
    original = tiny_model.get_cams
    tiny_model.get_cams = lambda pixels, *args, **kwargs: calls.append(tuple(pixels.shape)) or original(
        pixels, *args, **kwargs)
    try:
        batched_cams(tiny_model, tiny_processor, images, [[0], [2]], max_side=32)
    finally:
        del tiny_model.get_cams
    assert calls == [(2, 3, 24, 32)]  # both capped to 32x24: one bucket, one call


def test_get_cams_passes_the_box_threshold_and_forward_returns_its_text_embeds(tiny_model):
    torch.manual_seed(7)
    pixels = torch.randn(1, 3, 40, 48)
    default = tiny_model.get_cams(pixels, [[0, 2]], refine=True).cams
    loose = tiny_model.get_cams(pixels, [[0, 2]], refine=True, box_threshold=0.05).cams
    assert not torch.allclose(default, loose, atol=1e-3)
    with torch.no_grad():
        out = tiny_model(pixel_values=pixels)
        torch.testing.assert_close(out.text_embeds, tiny_model.get_text_features())


def test_a_cam_networks_processor_takes_its_config(tiny_clip):
    from pole_hf import PoleCamNetworkConfig, PoleImageProcessor

    config = PoleCamNetworkConfig(class_names=["cat", "dog", "sofa"], image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                                  cam_scales=[1.0, 0.5], cam_flip=False, background_threshold=0.3)
    network = type("Network", (), {"config": config})()
    processor = PoleImageProcessor.for_model(network)
    assert (processor.image_mean, processor.image_std) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert processor.patch_size == 1 and list(processor.scales) == [1.0, 0.5] and processor.flip is False
    assert processor.cam_merge == "max" and processor.background == "threshold" and processor.bg_threshold == 0.3


def test_segment_passes_the_crf_image_on(tiny_processor):
    from pole_hf import CamOutput

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    cams = torch.from_numpy(rng.random((2, 24, 32)).astype(np.float32))
    output = CamOutput(cams=cams, class_indices=torch.tensor([0, 2]), scores=torch.ones(2))
    masks = {mode: tiny_processor.segment([output], [image], crf=True, crf_image=mode)[0] for mode in ("clip_es", "rgb")}
    assert (masks["clip_es"] != masks["rgb"]).any()


def test_computation_size_at_one_patch_and_below():
    from pole_hf import PoleImageProcessor

    processor = PoleImageProcessor(patch_size=8)
    assert processor.computation_size(8, 8) == (8, 8)  # exactly one patch is accepted
    assert processor.computation_size(8, 8, scale=0.5) == (8, 8)  # a scaled-down patch still rounds up to one
    assert processor.computation_size(40, 8, scale=0.5) == (8, 24)


def test_segment_refuses_a_crf_without_matching_images_and_runs_it_at_max_side(tiny_model, tiny_processor):
    from pole_hf import CamOutput, PoleImageProcessor

    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    output = CamOutput(cams=torch.from_numpy(rng.random((2, 24, 32)).astype(np.float32)),
                       class_indices=torch.tensor([0, 2]), scores=torch.ones(2))
    for images in (None, [image, image]):
        with pytest.raises(ValueError, match="images"):
            tiny_processor.segment([output], images, crf=True)
    small = PoleImageProcessor.from_dict({**tiny_processor.to_dict(), "max_side": 16})
    full, capped = (p.segment([output], [image], crf=True)[0] for p in (tiny_processor, small))
    assert full.shape == capped.shape == (24, 32) and (full != capped).any()
    out = tiny_model.get_cams(torch.randn(1, 3, 24, 32), [[0, 2]])
    plain = tiny_processor.post_process_semantic_segmentation(out)[0]
    ignored = tiny_processor.post_process_semantic_segmentation(out, ignore_below=0.999)[0]
    assert (ignored == 255).any() and not (plain == 255).any()
