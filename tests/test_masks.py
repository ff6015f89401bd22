"""Tests of CAM -> pseudo mask conversion, the VOC palette, overlays and the dense CRF."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pole_hf.masks import (
    IGNORE_ID,
    VOC_PALETTE,
    BackgroundRule,
    background_score,
    cams_to_mask,
    class_scores,
    crf_image,
    crf_refine,
    crf_scores,
    image_to_mask,
    jet_colormap,
    mask_to_image,
    overlay,
    overlay_mask,
    scores_to_mask,
)

FAST = settings(max_examples=40, deadline=None)


@st.composite
def cams_and_ids(draw, max_classes=4):
    """Random CAMs [k, H, W] in [0, 1] with k distinct class ids in 1..20."""
    k = draw(st.integers(0, max_classes))
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    cams = draw(hnp.arrays(np.float32, (k, height, width), elements=st.floats(0, 1, width=32, allow_subnormal=False)))
    ids = draw(st.lists(st.integers(1, 20), min_size=k, max_size=k, unique=True))
    return cams, ids


@FAST
@given(cams_and_ids(), st.sampled_from(["power", "threshold"]), st.sampled_from([1.0, 2.0]), st.floats(0.05, 0.95))
def test_only_given_classes_and_background_appear(data, mode, power, threshold):
    cams, ids = data
    mask = cams_to_mask(cams, ids, BackgroundRule(mode, power, threshold))
    assert mask.dtype == np.uint8 and mask.shape == cams.shape[1:]
    assert set(np.unique(mask)) <= {0, *ids}


@FAST
@given(cams_and_ids())
def test_argmax_rule_matches_definition(data):
    cams, ids = data
    mask = cams_to_mask(cams, ids, BackgroundRule("power", 2.0))
    if not ids:
        assert (mask == 0).all()
        return
    peak = cams.max(axis=0)
    background = (1 - peak) ** 2
    # wherever a class strictly beats the background, the mask holds the id of one of the maximal maps
    fg = peak > background
    assert (mask[~fg] == 0).all()
    for y, x in zip(*np.nonzero(fg)):
        assert mask[y, x] in {ids[i] for i in np.flatnonzero(cams[:, y, x] == peak[y, x])}


@FAST
@given(cams_and_ids(), st.floats(0.0, 1.0))
def test_ignore_only_where_low_confidence(data, ignore_below):
    cams, ids = data
    plain = cams_to_mask(cams, ids, BackgroundRule("threshold", threshold=0.3))
    ignored = cams_to_mask(cams, ids, BackgroundRule("threshold", threshold=0.3), ignore_below=ignore_below)
    if not ids:
        assert (ignored == 0).all()
        return
    winning = np.maximum(cams.max(axis=0), 0.3)
    np.testing.assert_array_equal(ignored == IGNORE_ID, winning < ignore_below)
    np.testing.assert_array_equal(ignored[ignored != IGNORE_ID], plain[ignored != IGNORE_ID])


@pytest.mark.parametrize("mode", ["power", "threshold"])
def test_all_zero_cams_give_background(mode):
    mask = cams_to_mask(np.zeros((3, 5, 7), np.float32), [1, 5, 9], BackgroundRule(mode, threshold=0.1))
    assert mask.shape == (5, 7) and (mask == 0).all()


def test_no_classes_gives_background():
    mask = cams_to_mask(np.zeros((0, 4, 6), np.float32), [])
    assert mask.shape == (4, 6) and (mask == 0).all()


def test_power_background_is_clip_es_rule():
    cams = np.array([[[0.2, 0.9]], [[0.5, 0.1]]], np.float32)
    np.testing.assert_allclose(background_score(cams, BackgroundRule("power", 2.0)), [[0.25, 0.01]], rtol=1e-6)
    assert cams_to_mask(cams, [4, 7], BackgroundRule(power=2.0)).tolist() == [[7, 4]]
    assert cams_to_mask(cams, [4, 7], BackgroundRule("threshold", threshold=0.6)).tolist() == [[0, 4]]
    scores = class_scores(cams, BackgroundRule("threshold", threshold=0.6))
    assert scores.shape == (3, 1, 2) and np.allclose(scores[0], 0.6)


def test_bad_inputs_raise_clear_errors():
    cams = np.zeros((2, 3, 3), np.float32)
    cams[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cams_to_mask(cams, [1, 2])
    with pytest.raises(ValueError, match="class_ids has 1"):
        cams_to_mask(np.zeros((2, 3, 3)), [1])
    with pytest.raises(ValueError, match=r"\[k, H, W\]"):
        cams_to_mask(np.zeros((3, 3)), [1])
    with pytest.raises(ValueError, match="class id 0"):
        cams_to_mask(np.zeros((1, 3, 3)), [0])
    with pytest.raises(ValueError, match="background must be"):
        cams_to_mask(np.zeros((1, 3, 3)), [1], BackgroundRule("otsu"))
    with pytest.raises(ValueError, match="scores must have shape"):
        scores_to_mask(np.zeros((2, 3, 3)), [1, 2])


def test_scores_to_mask_checks_its_class_ids_and_background():
    scores = np.zeros((2, 3, 3), np.float32)
    for bad in (0, 255):  # background and ignore are no class ids
        with pytest.raises(ValueError, match=f"class id {bad} is out of range"):
            scores_to_mask(scores, [bad])
    scores[0, 2, 2] = np.nan  # NaN only in the background channel
    with pytest.raises(ValueError, match="background scores contain NaN"):
        scores_to_mask(scores, [3])


def test_scores_to_mask_keeps_float64_precision():
    # a float64 score 1e-12 above the background wins; a float32 cast would tie it and give background
    scores = np.full((2, 1, 2), 0.5)
    scores[1, 0, 1] += 1e-12
    np.testing.assert_array_equal(scores_to_mask(scores, [7]), [[0, 7]])


def test_palette_is_the_voc_colour_map():
    assert len(VOC_PALETTE) == 768
    colours = np.array(VOC_PALETTE).reshape(256, 3)
    assert colours[0].tolist() == [0, 0, 0]
    assert colours[1].tolist() == [128, 0, 0]
    assert colours[15].tolist() == [192, 128, 128]  # person
    assert colours[20].tolist() == [0, 64, 128]  # tv/monitor
    assert colours[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in colours}) == 256


@FAST
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=16)))
def test_palette_round_trip_through_png(mask):
    buffer = io.BytesIO()
    image = mask_to_image(mask)
    assert image.mode == "P"
    image.save(buffer, format="PNG")
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    np.testing.assert_array_equal(image_to_mask(loaded), mask)
    np.testing.assert_array_equal(image_to_mask(loaded.convert("RGB")), mask)


def test_image_to_mask_rejects_unknown_colours():
    with pytest.raises(ValueError, match="not in the VOC palette"):
        image_to_mask(Image.new("RGB", (2, 2), (1, 2, 3)))


def test_jet_colormap_ends_and_middle():
    colours = jet_colormap(np.array([0.0, 0.5, 1.0]))
    assert colours.dtype == np.uint8 and colours.shape == (3, 3)
    assert colours[0, 2] > 100 and colours[0, :2].max() == 0  # blue at 0
    assert colours[1, 1] == 255  # green at the middle
    assert colours[2, 0] > 100 and colours[2, 1:].max() == 0  # red at 1


def test_overlay_shape_mode_and_alpha():
    image = Image.new("RGB", (20, 10), (10, 200, 30))
    cam = np.linspace(0, 1, 5 * 8, dtype=np.float32).reshape(5, 8)  # smaller than the image: resized
    blended = overlay(image, cam, alpha=0.5)
    assert blended.mode == "RGB" and blended.size == image.size
    assert np.array_equal(np.asarray(overlay(image, cam, alpha=0.0)), np.asarray(image))
    heat = np.asarray(overlay(image.convert("L"), np.ones((10, 20)), alpha=1.0))
    assert (heat == jet_colormap(np.array(1.0))).all()


def test_overlay_mask_colours_foreground_only():
    image = Image.new("RGB", (4, 3), (100, 100, 100))
    mask = np.zeros((3, 4), np.uint8)
    mask[1, 2] = 15
    out = np.asarray(overlay_mask(image, mask, alpha=1.0))
    assert out[1, 2].tolist() == [192, 128, 128] and out[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="differs"):
        overlay_mask(image, np.zeros((4, 3), np.uint8))


def _two_region_scene(seed=0, height=40, width=56):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    truth = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (height / 3) ** 2).astype(np.uint8) * 12
    colour = np.where(truth[..., None] > 0, [200, 40, 40], [30, 60, 170])
    image = np.clip(colour + rng.normal(0, 8, colour.shape), 0, 255).astype(np.uint8)
    cam = np.clip((truth > 0) * 0.7 + 0.15 + rng.normal(0, 0.25, truth.shape), 0, 1).astype(np.float32)
    return image, cam[None], truth


def test_crf_refine_cleans_a_noisy_mask():
    pytest.importorskip("pydensecrf.densecrf", reason="optional extra pole_hf[crf] (pydensecrf2) not installed")
    image, cams, truth = _two_region_scene()
    scores = class_scores(cams)
    noisy = scores_to_mask(scores, [12])
    refined = crf_refine(image, scores, iterations=10, pos_xy=1, pos_w=3, bi_xy=67, bi_rgb=3, bi_w=4)
    assert refined.shape == scores.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)
    cleaned = scores_to_mask(refined, [12])
    assert (cleaned == truth).mean() > (noisy == truth).mean() + 0.03
    assert (cleaned == truth).mean() > 0.98
    with pytest.raises(ValueError, match="uint8"):
        crf_refine(image.astype(np.float32), scores)


def test_crf_refine_names_the_package_when_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        crf_refine(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 2), np.float32))


def test_crf_image_is_clip_es_bgr_minus_mean_wrapped_to_uint8():
    import platform

    image = np.array([[[0, 0, 0], [255, 255, 255], [10, 200, 120]]], dtype=np.uint8)
    # BGR - (104.008, 116.669, 122.675), truncated toward zero, modulo 256
    expected = np.array([[[152, 140, 134], [150, 138, 132], [15, 83, 144]]], dtype=np.uint8)
    np.testing.assert_array_equal(crf_image(image), expected)
    np.testing.assert_array_equal(crf_image(image, "rgb"), image)
    if platform.machine() in ("x86_64", "AMD64"):  # CLIP-ES's own expression, whose negatives wrap on x86
        rng = np.random.default_rng(0)
        big = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        bgr = big[..., ::-1].astype(np.float32)
        bgr -= (104.008, 116.669, 122.675)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(crf_image(big), bgr.astype(np.uint8))
    with pytest.raises(ValueError, match="crf image mode"):
        crf_image(image, "bgr")


def test_crf_refine_uses_clip_es_inputs():
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="optional extra pole_hf[crf] (pydensecrf2) not installed")
    image, cams, _ = _two_region_scene()
    image = (image // 3).astype(np.uint8)  # dark: most of the mean-subtracted values wrap around
    scores = class_scores(cams)

    def by_hand(bilateral_image, unary):
        crf = dcrf.DenseCRF2D(image.shape[1], image.shape[0], 2)
        crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(2, -1), dtype=np.float32))
        crf.addPairwiseGaussian(sxy=1, compat=3)
        crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(bilateral_image), compat=4)
        return np.asarray(crf.inference(10), np.float32).reshape(scores.shape)

    half = scores.astype(np.float16)
    unary16 = (-np.log(np.clip(half, np.float16(1e-5), np.float16(1.0)))).astype(np.float32)
    assert unary16.dtype == np.float32 and not np.array_equal(unary16, -np.log(np.clip(scores, 1e-5, 1)))
    wrapped = np.mod(np.trunc(image[..., ::-1].astype(np.float64) - (104.008, 116.669, 122.675)), 256)
    np.testing.assert_array_equal(crf_refine(image, scores), by_hand(wrapped.astype(np.uint8), unary16))
    plain = by_hand(image, -np.log(np.clip(scores, 1e-5, 1)))
    np.testing.assert_allclose(crf_refine(image, scores, image_mode="rgb", half_precision=False), plain, atol=1e-6)


def test_crf_scores_round_the_maps_to_fp16_first(monkeypatch):
    import pole_hf.masks as masks

    seen = {}
    monkeypatch.setattr(masks, "crf_refine", lambda image, scores, **kw: seen.setdefault("scores", scores))
    cams = np.array([[[0.30001, 0.7], [0.123456, 1.0]]], dtype=np.float32)
    crf_scores(np.zeros((2, 2, 3), np.uint8), cams)
    half = cams.astype(np.float16)
    np.testing.assert_array_equal(seen["scores"][1], half[0].astype(np.float32))
    np.testing.assert_array_equal(seen["scores"][0].astype(np.float16), (np.float16(1) - half[0]))


def test_crf_scores_of_a_huge_image_run_at_the_computation_size(monkeypatch):
    import pole_hf.masks as masks

    sizes = []

    def fake_crf(image, scores, **kw):
        sizes.append((image.shape[:2], scores.shape))
        return scores / scores.sum(0, keepdims=True)

    monkeypatch.setattr(masks, "crf_refine", fake_crf)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    cams = rng.random((2, 60, 90)).astype(np.float32)
    marginals = crf_scores(image, cams, max_side=30)
    assert sizes == [((20, 30), (3, 20, 30))] and marginals.shape == (3, 60, 90)
    np.testing.assert_allclose(marginals.sum(0), 1.0, atol=1e-5)
    crf_scores(image, cams, max_side=90)  # not above the cap: full size, CLIP-ES's own path
    assert sizes[-1] == ((60, 90), (3, 60, 90))
