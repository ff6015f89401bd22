"""Behaviours a mutation run found unpinned (issue #17, second part): hand computations, round trips and boundary
sizes for the CAA, the CRF defaults, word selection with precomputed CAMs and prompt loading."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pole_hf import PoleImageProcessor, PolePromptModel, image_cams
from pole_hf.caa import (
    affinity_from_attention,
    box_mask,
    label_regions,
    minmax,
    refine_with_affinity,
    refine_with_transition,
    transition_from_attention,
)
from pole_hf.selection import select_class_words

# --- CAA (pole_hf.caa) ---

def test_minmax_normalises_each_map_by_its_own_minimum():
    maps = torch.tensor([[[1.0, 2.0, 3.0]], [[5.0, 7.0, 9.0]]])
    expected = torch.tensor([[[0.0, 1 / (2 + 1e-7), 2 / (2 + 1e-7)]], [[0.0, 2 / (4 + 1e-7), 4 / (4 + 1e-7)]]])
    torch.testing.assert_close(minmax(maps), expected)


def test_default_box_threshold_is_clip_es_0_4():
    grid = np.zeros((6, 6), dtype=np.float32)
    grid[0, 0] = 1.0  # uint8 255
    grid[3, 3] = 0.5  # uint8 127 > int(0.4 * 255) = 102: a box of its own (it would not be at 0.7: 127 <= 178)
    assert box_mask(grid).sum() == 2 and box_mask(grid)[3, 3]
    cams = torch.from_numpy(grid)[None]
    # the identity transition leaves the map inside its boxes untouched: both peaks survive the refinement
    refined = refine_with_transition(cams, torch.eye(36, dtype=torch.float64))
    assert refined[0, 0, 0] == pytest.approx(1.0) and refined[0, 3, 3] == pytest.approx(0.5, abs=1e-6)


def test_sinkhorn_one_round_by_hand():
    attention = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    # columns: [[2/3, 1/2], [1/3, 1/2]]; then rows: [[4/7, 3/7], [2/5, 3/5]]; then (T + T^t) / 2
    expected = torch.tensor([[4 / 7, 29 / 70], [29 / 70, 3 / 5]], dtype=torch.float64)
    torch.testing.assert_close(transition_from_attention(attention, rounds=1), expected)


def test_sinkhorn_converges_to_a_doubly_stochastic_matrix():
    attention = (torch.randn(7, 7, generator=torch.Generator().manual_seed(0)) * 2).softmax(-1)
    transition = transition_from_attention(attention, rounds=60)
    ones = torch.ones(7, dtype=torch.float64)
    torch.testing.assert_close(transition.sum(0), ones, atol=1e-9, rtol=0)
    torch.testing.assert_close(transition.sum(1), ones, atol=1e-9, rtol=0)


def test_affinity_is_two_random_walk_steps():
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # already doubly stochastic and symmetric: the transition itself
    torch.testing.assert_close(transition_from_attention(swap), swap.double())
    torch.testing.assert_close(affinity_from_attention(swap), torch.eye(2))  # two steps lead back home



def test_affinity_passes_its_rounds_on():
    attention = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    one_round = torch.tensor([[4 / 7, 29 / 70], [29 / 70, 3 / 5]], dtype=torch.float64)  # as in the test above
    torch.testing.assert_close(affinity_from_attention(attention, rounds=1), (one_round @ one_round).float())


def test_transition_leaves_a_float64_attention_untouched():
    attention = torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    transition_from_attention(attention)
    assert attention.tolist() == [[2.0, 1.0], [1.0, 1.0]]


def test_box_mask_reads_maps_as_float32_uint8_clipped_to_0_1():
    grid = np.zeros((4, 4))
    grid[0, 0] = 1.0
    grid[2, 2] = 103 / 255 - 1e-12  # float32: uint8 103 > int(0.4 * 255) = 102, a box; float64 would give 102
    mask = box_mask(grid)
    assert mask.dtype == bool and mask[2, 2] and mask.sum() == 2
    np.testing.assert_array_equal(mask, box_mask(grid.astype(np.float32)))
    assert box_mask(np.zeros((3, 3), np.float32)).sum() == 0  # nothing above zero: no box
    out_of_range = np.zeros((4, 5), np.float32)
    out_of_range[0, 0], out_of_range[0, 2], out_of_range[2, 2] = 1.004, -0.5, 0.45  # uint8 255, 0 and 114
    np.testing.assert_array_equal(box_mask(out_of_range), box_mask(np.clip(out_of_range, 0, 1)))
    assert box_mask(out_of_range).sum() == 2  # 1.004 reads as 255 (not wrapped to 0), -0.5 as 0 (not 129)


def test_label_regions_by_hand():
    mask = np.array([[1, 0, 0, 1],
                     [0, 1, 0, 1],
                     [0, 0, 0, 0]], bool)
    expected = np.array([[0, -1, -1, 3],  # each region labelled with its smallest flat index, background -1
                         [-1, 0, -1, 3],
                         [-1, -1, -1, -1]])
    np.testing.assert_array_equal(label_regions(mask), expected)


def test_refinement_box_edges_reach_the_boxes():
    cams = torch.zeros(1, 3, 3)
    cams[0, 2, 2] = 1.0  # only in the last row and column: outside CLIP-ES's boxes, inside the full box
    eye = torch.eye(9, dtype=torch.float64)
    assert refine_with_transition(cams, eye).sum() == 0
    assert refine_with_transition(cams, eye, box_edges="full")[0, 2, 2] == pytest.approx(1.0)
    assert refine_with_affinity(cams, eye.float(), box_edges="full")[0, 2, 2] == pytest.approx(1.0)


def test_refine_with_a_float64_affinity():
    torch.manual_seed(0)
    cams = minmax(torch.rand(2, 4, 5) ** 3)
    affinity = affinity_from_attention((torch.randn(20, 20) * 3).softmax(-1))
    torch.testing.assert_close(refine_with_affinity(cams, affinity.double()), refine_with_affinity(cams, affinity),
                               atol=1e-5, rtol=0)

def test_patch_grid_is_rounded_up(tiny_model, tiny_processor, random_image):
    image = random_image(0, 33, 41)
    output = image_cams(tiny_model, tiny_processor, image, [0])  # 33 / 8 = 4.1 and 41 / 8 = 5.1: ceil 5 x 6, round 4 x 5
    assert tuple(output.grid_cams.shape) == (1, 5, 6) and tuple(output.cams.shape) == (1, 33, 41)


# --- CRF defaults (pole_hf.masks) ---

CLIP_ES_CRF = {"iterations": 10, "pos_xy": 1, "pos_w": 3, "bi_xy": 67, "bi_rgb": 3, "bi_w": 4}  # eval_cam_with_crf.py
OTHER_CRF = {"iterations": 2, "pos_xy": 6, "pos_w": 10, "bi_xy": 5, "bi_rgb": 30, "bi_w": 20}


def test_crf_defaults_are_clip_es_voc_settings():
    pytest.importorskip("pydensecrf.densecrf", reason="optional extra pole_hf[crf] (pydensecrf2) not installed")
    from pole_hf.masks import crf_refine

    rng = np.random.default_rng(0)
    image = np.zeros((20, 24, 3), np.uint8)
    image[:, 12:] = (200, 40, 40)
    image = np.clip(image.astype(int) + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    fg = np.clip(np.linspace(0.1, 0.9, 24)[None].repeat(20, 0) + rng.normal(0, 0.2, (20, 24)), 0.01, 0.99)
    probs = np.stack([1 - fg, fg]).astype(np.float32)
    default = crf_refine(image, probs)
    np.testing.assert_array_equal(default, crf_refine(image, probs, image_mode="clip_es", half_precision=True,
                                                      **CLIP_ES_CRF))
    for name, value in OTHER_CRF.items():  # each setting changes the result on this image: each default is pinned
        assert not np.allclose(crf_refine(image, probs, **{**CLIP_ES_CRF, name: value}), default, atol=1e-4), name


# --- word selection with precomputed CAMs (pole_hf.selection) ---

def test_precomputed_cams_follow_the_labels_when_a_single_candidate_label_comes_first(tiny_model):
    candidates = {"cat": ["cat"], "dog": ["dog", "puppy", "hound"]}  # cat: one candidate, never scored
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    dog_map = np.zeros((8, 8), np.float32)
    dog_map[:4] = 1.0
    cat_map = np.zeros((8, 8), np.float32)
    cat_map[4:, 4:] = 1.0
    both = select_class_words(tiny_model, [(image, ["cat", "dog"])], candidates=candidates,
                              cams=[np.stack([cat_map, dog_map])], progress=False)
    alone = select_class_words(tiny_model, [(image, ["dog"])], candidates=candidates, cams=[dog_map[None]],
                               progress=False)
    wrong = select_class_words(tiny_model, [(image, ["dog"])], candidates=candidates, cams=[cat_map[None]],
                               progress=False)
    dog = next(c for c in both.choices if c.class_name == "dog")
    assert dog.probabilities == pytest.approx(alone.choices[0].probabilities, abs=1e-6)
    assert dog.probabilities != pytest.approx(wrong.choices[0].probabilities, abs=1e-6)  # the maps matter here


# --- prompt loading (pole_hf.loading) ---

@pytest.fixture()
def saved_full(tiny_clip_dir, tmp_path):
    """Prompts with learned context and adapters, every learned tensor moved off its initialisation."""
    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "dog", "sofa"], learn_context=True,
                                      use_adapters=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.learnable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(tmp_path / "prompts")
    return model, tmp_path / "prompts"


def test_context_and_adapters_round_trip(saved_full):
    model, path = saved_full
    loaded = PolePromptModel.from_pretrained(path)
    want, got = model.state_dict(), loaded.state_dict()
    learned = [name for name, _ in model.named_parameters() if not name.startswith("clip.")]
    assert any("context" in n for n in learned) and any("visual_adapter" in n for n in learned)
    assert any("text_adapter" in n for n in learned)
    for name in learned:
        assert torch.equal(got[name], want[name]), name
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, atol=0, rtol=0)


def _tamper(path, name, tensor):
    file = path / "model.safetensors"
    tensors = load_file(file)
    tensors[name] = tensor
    save_file(tensors, file)


@pytest.mark.parametrize("shape", [(3, 1, 16), (3, 1, 48)])
def test_class_tokens_of_another_width_are_refused(saved_full, shape):
    _, path = saved_full
    _tamper(path, "prompt_learner.class_tokens", torch.zeros(shape))
    with pytest.raises(ValueError, match=rf"class_tokens has shape \({shape[0]}, 1, {shape[2]}\)"):
        PolePromptModel.from_pretrained(path)


@pytest.mark.parametrize("rows", [0, 1])
def test_context_of_another_shape_is_refused(saved_full, rows):
    model, path = saved_full
    context = model.prompt_learner.context
    shape = (context.shape[0] + rows, context.shape[1] + (1 - rows) * 16)  # one row more, or wider
    _tamper(path, "prompt_learner.context", torch.zeros(shape))
    with pytest.raises(ValueError, match=r"context has shape"):
        PolePromptModel.from_pretrained(path)


@pytest.mark.parametrize("name", ["suffix_ids", "background_ids", "prefix_ids"])
def test_every_id_buffer_is_checked_against_the_vocabulary(saved_full, name):
    model, path = saved_full
    ids = getattr(model.prompt_learner, name).clone()
    ids.view(-1)[-1] = model.clip.config.text_config.vocab_size  # one past the last token id
    _tamper(path, f"prompt_learner.{name}", ids)
    with pytest.raises(ValueError, match=f"{name} has token ids outside the base vocabulary"):
        PolePromptModel.from_pretrained(path)


# --- the best sweep setting (pole_hf.evaluation) ---

def _sweep(mode, values, cam, target):
    from pole_hf.evaluation import ThresholdSweep

    return ThresholdSweep(2, values, mode=mode).update(np.array([[cam]], np.float32), [1], np.array([target]))


def test_best_of_picks_the_sweep_with_the_higher_miou_and_names_its_setting():
    from pole_hf.evaluation import _best_of

    cam, target = [0.1, 0.45, 0.7, 0.9], [0, 1, 1, 1]
    # power 1: background 1 - 0.45 = 0.55 beats 0.45 at pixel 1: IoU 1/2 and 2/3; threshold 0.4: every pixel right
    result = _best_of([_sweep("power", (1.0,), cam, target), _sweep("threshold", (0.4, 0.6), cam, target)],
                      ["background", "cat"])
    assert (result["miou"], result["bg_threshold"]) == (1.0, 0.4) and "bg_power" not in result
    assert result["per_class_iou"] == {"background": 1.0, "cat": 1.0}
    assert set(result["curve"]) == {"power", "threshold"} and "cat" in result["table"]
    assert result["curve"]["power"] == [(1.0, pytest.approx((1 / 2 + 2 / 3) / 2))]
    cam, target = [0.1, 0.3, 0.7, 0.9], [0, 0, 1, 1]
    result = _best_of([_sweep("threshold", (0.95,), cam, target), _sweep("power", (1.0,), cam, target)],
                      ["background", "cat"])
    assert (result["miou"], result["bg_power"]) == (1.0, 1.0) and "bg_threshold" not in result


def test_sweep_best_skips_settings_without_pixels():
    from pole_hf.evaluation import ThresholdSweep

    sweep = ThresholdSweep(2, (0.2, 0.5))
    sweep.matrices[1].update(np.array([0, 1]), np.array([0, 1]))  # the first setting saw nothing: mIoU NaN
    assert sweep.best() == (0.5, 1.0)


def test_precision_of_a_class_predicted_once():
    from pole_hf.evaluation import ConfusionMatrix

    matrix = ConfusionMatrix(2).update(np.array([0, 0, 1]), np.array([0, 1, 1]))
    np.testing.assert_allclose(matrix.precision(), [1 / 2, 1.0])  # class 1: predicted once, right once


# --- the CRF's image and the masked images for selection ---

def test_crf_rgb_image_is_a_fresh_c_contiguous_uint8_copy():
    from pole_hf.masks import crf_image

    image = np.random.default_rng(0).integers(0, 255, (4, 6, 3), dtype=np.uint8)
    out = crf_image(image, "rgb")
    assert not np.shares_memory(out, image) and out.flags.writeable
    turned = crf_image(image.transpose(1, 0, 2), "rgb")
    assert turned.flags.c_contiguous and np.array_equal(turned, image.transpose(1, 0, 2))
    wide = crf_image(image.astype(np.int64), "rgb")
    assert wide.dtype == np.uint8 and np.array_equal(wide, image)


def test_masked_pixel_values_clip_maps_to_0_1_and_stay_float32():
    from pole_hf.selection import masked_pixel_values

    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    maps = np.zeros((2, 8, 8))  # float64
    maps[0], maps[1, :4] = 2.0, -1.0
    out = masked_pixel_values(image, maps, (8, 8), PoleImageProcessor(image_mean=(0, 0, 0), image_std=(1, 1, 1)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((3, 8, 8), 200 / 255))  # 2.0 counts as 1
    assert out[1].abs().max() == 0  # -1 counts as 0 (no negative image)
    as_mask = masked_pixel_values(image, (maps > 1).astype(np.uint8), (8, 8),
                                  PoleImageProcessor(image_mean=(0, 0, 0), image_std=(1, 1, 1)))
    torch.testing.assert_close(as_mask, out)  # a 0/1 uint8 mask works as a map


def test_masked_pixel_values_resize_maps_with_half_pixel_centres():
    from pole_hf.selection import masked_pixel_values

    image = Image.fromarray(np.full((4, 4, 3), 255, np.uint8))
    maps = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)
    mean, std = np.zeros(3), np.ones(3)  # float64 arrays: the result is still float32
    out = masked_pixel_values(image, maps, (4, 4), PoleImageProcessor(image_mean=mean, image_std=std))
    assert out.dtype == torch.float32
    # bilinear, align_corners=False: source x = (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped to 0 and 1)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_selection_summary_counts_missing_words_as_zero():
    from pole_hf.selection import SelectionResult, WordChoice

    result = SelectionResult(candidates={"cat": ["cat", "kitty"], "dog": ["dog", "puppy"]}, template="{}.")
    result.choices = [WordChoice(0, None, "cat", "cat", {"cat": 0.8, "kitty": 0.2}),
                      WordChoice(1, None, "cat", "cat", {"cat": 0.6})]  # no probability for "kitty"
    summary = result.summary()
    assert summary["cat"].mean_probability == pytest.approx({"cat": 0.7, "kitty": 0.1})
    assert summary["dog"].mean_probability == {"dog": 0.0, "puppy": 0.0} and summary["dog"].winner is None


def test_voc_labels_from_a_grey_mask_keep_the_first_and_last_class(tmp_path):
    from pole_hf.data.voc import _labels_from_mask

    values = np.array([[0, 1, 20, 21, 255]], np.uint8)  # background, first class, last class, beyond, ignore
    for mode in ("L", "P"):
        path = tmp_path / f"mask-{mode}.png"
        Image.fromarray(values).convert(mode).save(path)
        assert _labels_from_mask(str(path), 20) == [0, 19], mode
    Image.fromarray(values).convert("RGB").save(tmp_path / "mask-RGB.png")  # colours are not ids: refused
    with pytest.raises(ValueError, match="mask-RGB.png is a RGB image"):
        _labels_from_mask(str(tmp_path / "mask-RGB.png"), 20)


def test_pair_maps_without_pairs():
    from pole_hf.cam_network_objective import pair_maps

    maps, images, classes = pair_maps(torch.rand(2, 3, 4, 4), [[], []])
    assert maps.shape == (0, 4, 4) and images.dtype == classes.dtype == torch.long
    maps, images, classes = pair_maps(torch.arange(2 * 3 * 1.0).view(2, 3, 1, 1), [[2], [0, 1]])
    assert maps.flatten().tolist() == [2.0, 3.0, 4.0] and images.tolist() == [0, 1, 1]
