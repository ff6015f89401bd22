"""`pipeline("pole-cam")` from a saved folder: labels or none, batches, and bad inputs."""

import helpers
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import pole_hf  # noqa: F401  (registers the task)
from pole_hf.images import ImageInputError, load_image
from pole_hf.masks import VOC_PALETTE


@pytest.fixture()
def pipe(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "prompts")
    return pipeline("pole-cam", model=str(tmp_path / "prompts"))


def random_image(height=37, width=53, seed=0):
    return helpers.random_image(seed, height, width)


def test_pipeline_with_labels(pipe):
    out = pipe(random_image(), labels=["sofa", "cat"], return_overlay=True)
    assert out["labels"] == ["sofa", "cat"] and len(out["scores"]) == 2
    assert out["cams"].shape == (2, 37, 53) and out["cams"].dtype == np.float32
    mask = out["mask"]
    assert mask.mode == "P" and mask.size == (53, 37) and mask.getpalette()[:30] == VOC_PALETTE[:30]
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 3}
    assert out["overlay"].mode == "RGB" and out["overlay"].size == (53, 37)


def test_pipeline_mask_follows_cams(pipe):
    out = pipe(random_image(), labels=["dog"], background="threshold", bg_threshold=0.5)
    expected = np.where(out["cams"][0] > 0.5, 2, 0)
    assert (np.asarray(out["mask"]) == expected).mean() > 0.99


def test_pipeline_without_labels_predicts_classes(pipe):
    out = pipe(random_image())
    assert out["labels"] and set(out["labels"]) <= {"cat", "dog", "sofa"}
    assert out["cams"].shape[0] == len(out["labels"])


def test_pipeline_batches_paths_arrays_and_pil(pipe, tmp_path):
    path = tmp_path / "image.png"
    random_image(40, 40, seed=3).save(path)
    array = np.asarray(random_image(24, 64, seed=4))
    outs = pipe([str(path), array, random_image()], labels=[["cat"], ["dog", "sofa"], ["cat"]], refine=True)
    assert [o["labels"] for o in outs] == [["cat"], ["dog", "sofa"], ["cat"]]
    assert [o["cams"].shape for o in outs] == [(1, 40, 40), (2, 24, 64), (1, 37, 53)]
    same = pipe([random_image(), random_image()], labels=["dog"])
    np.testing.assert_allclose(same[0]["cams"], same[1]["cams"])
    single = pipe(random_image(), labels=["cat"], refine=True)
    np.testing.assert_allclose(outs[2]["cams"], single["cams"], atol=1e-6)


def test_unknown_label_lists_known_classes(pipe):
    with pytest.raises(ValueError, match="unknown label 'horse'; known classes: cat, dog, sofa"):
        pipe(random_image(), labels=["horse"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "1"])
def test_image_modes_are_converted(pipe, mode):
    base = random_image(32, 40)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        assert image.mode.startswith("I;16")
    elif mode == "P":
        image = base.convert("P")
    else:
        image = base.convert(mode)
    out = pipe(image, labels=["cat"])
    assert out["cams"].shape == (1, 32, 40) and np.isfinite(out["cams"]).all()


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    image = random_image(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(str(tmp_path / "rotated.jpg")).size == (20, 30)
    with Image.open(tmp_path / "rotated.jpg") as opened:  # an opened PIL image too, and exif=False keeps the grid
        assert load_image(opened).size == (20, 30) and load_image(opened, exif=False).size == (30, 20)


def test_an_upright_rgb_image_is_used_as_it_is():
    # each processor call (one per scale and flip) loads its images again: an RGB image without an EXIF rotation
    # is not copied
    image = random_image(20, 30)
    assert load_image(image) is image


def test_small_images_are_refused_with_the_minimum(pipe):
    with pytest.raises(ValueError, match="at least 8 pixels per side"):
        pipe(random_image(5, 40), labels=["cat"])


def test_large_images_are_downscaled_but_maps_come_back_full_size(pipe):
    out = pipe(random_image(300, 200), labels=["cat"], max_side=64)
    assert out["cams"].shape == (1, 300, 200)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"this is not a png", "corrupt, truncated or not an image"),
])
def test_bad_files_are_named(pipe, tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageInputError, match=message) as info:
        pipe(str(path), labels=["cat"])
    assert "bad.png" in str(info.value)


def test_truncated_jpeg_is_named(tmp_path):
    path = tmp_path / "cut.jpg"
    random_image(64, 64).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageInputError, match="cut.jpg"):
        load_image(str(path))


def test_urls_fail_clearly_offline(pipe):
    with pytest.raises(ImageInputError, match="offline mode is on"):
        pipe("https://example.com/cat.jpg", labels=["cat"])


def test_numpy_float_and_chw_arrays():
    assert load_image(np.random.rand(3, 10, 12).astype(np.float32)).size == (12, 10)
    with pytest.raises(ImageInputError, match="NaN"):
        load_image(np.full((8, 8), np.nan))
    assert load_image(torch.zeros(10, 12, 3)).size == (12, 10)


def test_pipeline_crf_refines_scores(pipe):
    pytest.importorskip("pydensecrf", reason="the crf extra is not installed")
    image = Image.new("RGB", (48, 40), (20, 20, 20))
    image.paste((230, 230, 230), (0, 0, 24, 40))
    out = pipe(image, labels=["cat"], crf=True, ignore_below=0.2)
    mask = np.asarray(out["mask"])
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 1, 255}
    # the CRF follows the image edge: each half comes out as one label
    assert len(np.unique(mask[:, :20])) == 1 and len(np.unique(mask[:, 28:])) == 1


def test_pipeline_crf_masks_drop_unsure_pixels_as_clip_es(pipe):
    pytest.importorskip("pydensecrf", reason="the crf extra is not installed")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    default = np.asarray(pipe(image, labels=["cat", "dog"], refine=True, crf=True)["mask"])
    kept = np.asarray(pipe(image, labels=["cat", "dog"], refine=True, crf=True, ignore_below=0)["mask"])
    unsure = default == 255
    assert unsure.any() and not (kept == 255).any()  # the 0.95 marginal cut of eval_cam_with_crf.py
    np.testing.assert_array_equal(default[~unsure], kept[~unsure])
    corrected = np.asarray(pipe(image, labels=["cat", "dog"], refine=True, crf=True, crf_image="rgb",
                                box_edges="full", position_embedding="bicubic")["mask"])
    assert corrected.shape == default.shape


def test_batch_size_unknown_arguments_and_bad_values(world_prompts):
    pipe = pipeline("pole-cam", model=world_prompts)
    images = [Image.fromarray(np.full((24 + 8 * i, 32, 3), 60 * i, np.uint8)) for i in range(3)]
    batched = pipe(images, labels=["zebra"], batch_size=2)
    single = [pipe(image, labels=["zebra"]) for image in images]
    assert [o["cams"].shape for o in batched] == [(1, 24, 32), (1, 32, 32), (1, 40, 32)]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a["cams"], b["cams"], atol=1e-6)
    assert pipe([]) == []
    with pytest.raises(TypeError, match=r"unknown pole-cam argument\(s\) \['refin'\]"):
        pipe(images[0], refin=True)
    with pytest.raises(TypeError, match="refin"):
        pipeline("pole-cam", model=world_prompts, refin=True)
    for bad in ([], [0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="scales="):
            pipe(images[0], scales=bad)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="max_side="):
            pipe(images[0], max_side=bad)
