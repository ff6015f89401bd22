"""POLE losses: each term against a hand computation, clamping, masking layouts, gradients, optimisation."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pole_hf import PolePromptModel
from pole_hf.objective import (
    PoleObjective,
    btm_loss,
    cbs_loss,
    check_pairs,
    masked_images,
    otm_loss,
    pairs_from_cams,
    pairs_from_lists,
)

BACKGROUND = ["grass", "sky", "water"]


def unit(angle_degrees):
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def test_terms_match_hand_computation():
    # 2-D features: cos between unit vectors is cos of the angle between them
    text = torch.tensor([unit(0), unit(90), unit(30), unit(200)])  # class 0, class 1, background 0, background 1
    fg = torch.tensor([unit(60), unit(80)])  # pairs: (image, class 0), (image, class 1)
    bg = torch.tensor([unit(45), unit(170)])
    classes = torch.tensor([0, 1])
    out = PoleObjective().losses(fg, bg, text, classes, num_classes=2)
    fg_scores = [math.cos(math.radians(60)), math.cos(math.radians(10))]
    bg_scores = [math.cos(math.radians(45)), math.cos(math.radians(80))]
    otm = -(math.log(fg_scores[0]) + math.log(fg_scores[1])) / 2
    btm = -(math.log(1 - bg_scores[0]) + math.log(1 - bg_scores[1])) / 2
    # fg vs background prompts: cos(30)=.866, cos(140)<0, cos(50)=.643, cos(120)<0 -> two entries above 0.26
    cbs = -(math.log(1 - math.cos(math.radians(30))) + math.log(1 - math.cos(math.radians(50))))
    assert out.otm.item() == pytest.approx(otm, rel=1e-5)
    assert out.btm.item() == pytest.approx(btm, rel=1e-5)
    assert out.cbs.item() == pytest.approx(cbs, rel=1e-5) and out.cbs_pairs.item() == 2
    assert out.loss.item() == pytest.approx(10 * otm + 25 * btm + 1 * cbs, rel=1e-5)
    torch.testing.assert_close(out.fg_scores, torch.tensor(fg_scores))
    weighted = PoleObjective(weights={"btm": 0.0, "cbs": 2.0}).losses(fg, bg, text, classes, num_classes=2)
    assert weighted.loss.item() == pytest.approx(10 * otm + 2 * cbs, rel=1e-5)


def test_cbs_counts_only_similarities_above_the_threshold():
    similarity = torch.tensor([[0.30, 0.26, 0.10], [-0.5, 0.27, 0.9]])
    loss, counted = cbs_loss(similarity, threshold=0.26)
    assert counted.item() == 3  # 0.26 itself is not above
    assert loss.item() == pytest.approx(-(math.log(0.70) + math.log(0.73) + math.log(0.1)), rel=1e-5)
    loss, counted = cbs_loss(similarity, threshold=0.95)
    assert counted.item() == 0 and loss.item() == 0.0


def test_clamping_keeps_scores_at_zero_and_one_finite():
    scores = torch.tensor([0.0, 1.0, -0.3], requires_grad=True)
    otm, btm = otm_loss(scores), btm_loss(scores)
    cbs, _ = cbs_loss(scores[None], threshold=0.26)
    assert otm.item() == pytest.approx(-(2 * math.log(1e-4) + math.log(0.9999)) / 3, rel=1e-5)
    assert btm.item() == pytest.approx(-(2 * math.log(1 - 1e-4) + math.log(1e-4)) / 3, rel=1e-4)
    assert cbs.item() == pytest.approx(-math.log(1e-4), rel=1e-4)
    (otm + btm + cbs).backward()
    assert torch.isfinite(scores.grad).all()
    identical = F.normalize(torch.ones(1, 4), dim=-1)  # fg == bg == text: scores exactly 1
    out = PoleObjective().losses(identical, identical, torch.cat([identical, identical]), torch.tensor([0]), 1)
    assert all(torch.isfinite(t) for t in (out.loss, out.otm, out.btm, out.cbs))
    with pytest.raises(ValueError, match="0 < low < high < 1"):
        PoleObjective(clamp=(0.0, 1.0))


def test_masked_images_layouts_agree_and_split_the_image():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 16, 16)
    cams = torch.rand(2, 2, 4, 4)
    fg, bg = masked_images(pixels, cams.flatten(0, 1), image_indices=[0, 0, 1, 1])
    assert fg.shape == bg.shape == (4, 3, 16, 16)
    torch.testing.assert_close(fg + bg, pixels.repeat_interleave(2, dim=0))
    up = F.interpolate(cams[1, 0][None, None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(fg[2], up * pixels[1])
    maps, images, classes = pairs_from_lists([cams[0], cams[1]], [[2, 0], [1, 2]])
    assert images.tolist() == [0, 0, 1, 1] and classes.tolist() == [2, 0, 1, 2]
    as_list = masked_images(pixels, maps, image_indices=images)
    padded = pairs_from_cams(cams, torch.tensor([[2, 0], [1, 2]]))
    for other in (as_list, masked_images(pixels, padded[0], image_indices=padded[1])):
        torch.testing.assert_close(other[0], fg)
        torch.testing.assert_close(other[1], bg)
    small_fg, _ = masked_images(pixels, cams.flatten(0, 1), image_indices=[0, 0, 1, 1], size=(8, 8))
    assert small_fg.shape == (4, 3, 8, 8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    black = masked_images(pixels, torch.zeros(2, 4, 4), image_mean=mean, image_std=std)[0]  # one map per image
    torch.testing.assert_close(black[:, :, 0, 0], ((torch.zeros(3) - torch.tensor(mean)) / 0.2).expand(2, 3))


def test_layout_errors():
    pixels = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="pass image_indices"):
        check_pairs(torch.zeros(3, 4, 4), 2)
    with pytest.raises(ValueError, match=r"image_indices \[0, 2\]"):
        check_pairs(torch.zeros(2, 4, 4), 2, image_indices=[0, 2])
    with pytest.raises(ValueError, match=r"give \[P, h, w\]"):
        masked_images(pixels, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="CAMs for 1 images but 2 label lists"):
        pairs_from_lists([torch.zeros(1, 4, 4)], [[0], [1]])
    with pytest.raises(ValueError, match="image 0 has 1 maps for 2 classes"):
        pairs_from_lists([torch.zeros(1, 4, 4)], [[0, 1]])
    with pytest.raises(ValueError, match="unknown loss weights"):
        PoleObjective(weights={"area": 1.0})


def prompt_model(tiny_clip_dir, **options):
    return PolePromptModel.from_clip(tiny_clip_dir, class_names=["cat", "dog", "sofa"], background_words=BACKGROUND,
                                     **options)


@pytest.mark.parametrize("adapters", [False, True])
def test_gradients_reach_only_the_prompts(tiny_clip_dir, adapters):
    model = prompt_model(tiny_clip_dir, use_adapters=adapters, image_feature="pooled")
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    maps, images, classes = pairs_from_lists([torch.rand(2, 4, 4), torch.rand(1, 4, 4)], [[0, 2], [1]])
    out = PoleObjective(cbs_threshold=0.0)(model, pixels, maps, classes, image_indices=images)
    out.loss.backward()
    assert out.cbs_pairs.item() > 0
    assert all(p.grad is None for p in model.clip.parameters())
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("clip.")}
    assert grads["prompt_learner.class_tokens"].abs().sum() > 0
    if adapters:
        assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "adapter" in n)
    else:
        assert set(grads) == {"prompt_learner.class_tokens"}


def test_optimizer_steps_reduce_the_loss(tiny_clip_dir):
    # the pooled image feature gives positive cosines on the tiny CLIP, so no score sits at the clamp
    model = prompt_model(tiny_clip_dir, image_feature="pooled")
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    cams = torch.rand(3, 4, 4)  # one map per image
    classes = torch.tensor([0, 1, 2])
    objective = PoleObjective(cbs_threshold=0.05)
    optimizer = torch.optim.Adam(model.learnable_parameters(), lr=5e-3)
    history = []
    for _ in range(5):
        out = objective(model, pixels, cams, classes)
        history.append(out)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    first, last = history[0], objective(model, pixels, cams, classes)
    assert (first.fg_scores > 1e-4).all() and (first.bg_scores < 0.9999).all()
    assert last.loss < first.loss
    assert last.otm < first.otm
    assert all(b.loss <= a.loss for a, b in itertools.pairwise(history))


def test_with_the_models_cams_and_no_pairs(tiny_model):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 40)
    labels = [[1], [0, 2]]
    output = tiny_model.get_cams(pixels, labels)  # [2, 2, 4, 5] patch-grid maps, the first image's second slot empty
    maps, images, classes = pairs_from_cams(output.cams, output.cam_classes)
    assert images.tolist() == [0, 1, 1] and classes.tolist() == [1, 0, 2]
    out = PoleObjective()(tiny_model, pixels, maps, classes, image_indices=images)
    assert out.fg_scores.shape == (3,) and torch.isfinite(out.loss)
    listed = pairs_from_lists([maps[:1], maps[1:]], labels)
    torch.testing.assert_close(out.loss, PoleObjective()(tiny_model, pixels, listed[0], listed[2],
                                                         image_indices=listed[1]).loss)
    half = PoleObjective()(tiny_model, pixels, maps, classes, image_indices=images, pair_share=0.5)
    torch.testing.assert_close(half.loss, 0.5 * (10 * out.otm + 25 * out.btm) + out.cbs)
    empty = PoleObjective()(tiny_model, pixels, torch.zeros(0, 4, 5), [], image_indices=[])
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad
    with pytest.raises(ValueError, match="must lie in"):
        PoleObjective()(tiny_model, pixels, maps, [5, 0, 2], image_indices=images)
    with pytest.raises(ValueError, match="2 class indices for 3 CAMs"):
        PoleObjective()(tiny_model, pixels, maps, [1, 0], image_indices=images)


@pytest.mark.parametrize("kind", ["pooled", "patch_mean"])
def test_image_feature_override_matches_the_model_of_that_kind(tiny_clip_dir, kind):
    other = "patch_mean" if kind == "pooled" else "pooled"
    model = prompt_model(tiny_clip_dir, image_feature=other, use_adapters=True)
    reference = prompt_model(tiny_clip_dir, image_feature=kind, use_adapters=True)
    reference.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(PoleObjective(image_feature=kind).image_features(model, pixels),
                                   reference.get_image_features(pixels))
    with pytest.raises(ValueError, match="image_feature='cls'"):
        PoleObjective(image_feature="cls")
