"""Behaviours of the core modules that mutation testing (issue #17, benchmarks/mutation.py) found unpinned: the POLE
objective's masking, layouts and loss plumbing, the CAM-network objective's per-pair words, with hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from pole_hf.objective import PoleObjective, check_pairs, masked_images, pairs_from_cams, pairs_from_lists

# --- objective: masked_images -------------------------------------------------------------------------------------


def test_masked_images_resizes_pixels_with_half_pixel_centres():
    # a 1x2 image [0, 4] resized to 1x4 with align_corners=False: [0, 1, 3, 4] (corners aligned would give 4/3, 8/3)
    pixels = torch.tensor([0.0, 4.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    fg, bg = masked_images(pixels, torch.ones(1, 1, 2), size=(1, 4))
    torch.testing.assert_close(fg[0, 0, 0], torch.tensor([0.0, 1.0, 3.0, 4.0]))
    torch.testing.assert_close(bg, torch.zeros(1, 3, 1, 4))


def test_masked_images_clamps_maps_and_resizes_them_to_the_image():
    pixels = torch.full((1, 3, 2, 4), 2.0)
    # a 1x2 map [-1, 3] clamped to [0, 1] after the bilinear resize to 2x4: [-1, 0, 2, 3] -> [0, 0, 1, 1]
    fg, bg = masked_images(pixels, torch.tensor([[[-1.0, 3.0]]]))
    torch.testing.assert_close(fg[0, :, 1], torch.tensor([0.0, 0.0, 2.0, 2.0]).expand(3, 4))
    torch.testing.assert_close(bg[0, :, 0], torch.tensor([2.0, 2.0, 0.0, 0.0]).expand(3, 4))


def test_masked_images_detaches_the_maps_unless_asked():
    pixels = torch.ones(1, 3, 2, 2)
    maps = torch.full((1, 2, 2), 0.25, requires_grad=True)
    fg, bg = masked_images(pixels, maps)
    assert not fg.requires_grad and not bg.requires_grad
    fg, bg = masked_images(pixels, maps, detach=False)
    (fg.sum() + 2 * bg.sum()).backward()
    # d/dm of (m x + 2 (1 - m) x) with x = 1 over 3 channels: 3 * (1 - 2) = -3
    torch.testing.assert_close(maps.grad, torch.full((1, 2, 2), -3.0))


def test_masked_images_keep_the_pixels_dtype():
    # bfloat16 pixels (mixed precision) with float32 maps and Python-float mean/std: the images stay bfloat16
    pixels = torch.zeros(1, 3, 2, 2, dtype=torch.bfloat16)
    maps = torch.full((1, 2, 2), 0.5, dtype=torch.float32)
    for fg, bg in (masked_images(pixels, maps), masked_images(pixels, maps, image_mean=[0.5] * 3,
                                                              image_std=[0.25] * 3)):
        assert fg.dtype == bg.dtype == torch.bfloat16
    # pixel space: x = 0 is the mean colour 0.5; half of it, renormalised: (0.25 - 0.5) / 0.25 = -1
    torch.testing.assert_close(fg.float(), torch.full((1, 3, 2, 2), -1.0))


def test_masked_images_follow_the_pixels_device():
    # the meta device stands in for a GPU: maps, mean and std given on the CPU must move to the pixels' device
    pixels = torch.zeros(2, 3, 8, 8, device="meta")
    fg, bg = masked_images(pixels, torch.rand(3, 4, 4), [0, 1, 1], size=(6, 6), image_mean=[0.5] * 3,
                           image_std=[0.2] * 3)
    assert fg.device.type == bg.device.type == "meta" and fg.shape == bg.shape == (3, 3, 6, 6)


# --- objective: pairs ---------------------------------------------------------------------------------------------


def test_pairs_from_cams_reads_each_rows_image():
    cams = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)  # image i's map is all i
    maps, images, classes = pairs_from_cams(cams, torch.tensor([[4], [-1], [2]]))
    assert images.tolist() == [0, 2] and classes.tolist() == [4, 2]
    torch.testing.assert_close(maps[:, 0, 0], torch.tensor([0.0, 2.0]))


def test_pairs_from_lists_takes_2d_maps_and_images_without_labels():
    maps, images, classes = pairs_from_lists([torch.ones(3, 5), torch.zeros(0, 3, 5), torch.zeros(2, 3, 5)],
                                             [[1], [], [0, 2]])
    assert maps.shape == (3, 3, 5)
    assert images.tolist() == [0, 2, 2] and classes.tolist() == [1, 0, 2]
    assert classes.dtype == images.dtype == torch.long  # an empty label list must not turn the classes float


def test_pairs_from_lists_of_no_images_is_no_pairs():
    maps, images, classes = pairs_from_lists([], [])  # raised from torch.cat before
    assert maps.shape[0] == images.numel() == classes.numel() == 0
    check_pairs(maps, 0, images)  # [P, h, w] maps: the layout the objective takes
    assert images.dtype == classes.dtype == torch.long


# --- objective: losses and forward ------------------------------------------------------------------------------


def test_losses_use_the_objectives_clamp():
    # scores 0.05 (foreground) and 0.95 (background): inside CLIMS's clamp, outside (0.1, 0.9)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # class 0, then one background prompt
    fg = torch.tensor([[0.05, math.sqrt(1 - 0.05 ** 2)]])
    bg = torch.tensor([[0.95, math.sqrt(1 - 0.95 ** 2)]])
    out = PoleObjective(clamp=(0.1, 0.9), cbs_threshold=0.5).losses(fg, bg, text, torch.tensor([0]), 1)
    assert out.otm.item() == pytest.approx(-math.log(0.1), rel=1e-5)
    assert out.btm.item() == pytest.approx(-math.log(1 - 0.9), rel=1e-5)
    # fg . background = 0.9987 > 0.5: clamped to 0.9
    assert out.cbs.item() == pytest.approx(-math.log(1 - 0.9), rel=1e-5) and out.cbs_pairs.item() == 1


def test_losses_without_background_prompts_or_pairs():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)  # two classes, no background prompt
    fg = torch.tensor([[0.6, 0.8]], requires_grad=True)
    out = PoleObjective().losses(fg, fg, text, torch.tensor([1]), 2)
    assert out.cbs.item() == 0.0 and out.cbs_pairs.item() == 0 and out.cbs_pairs.dtype == torch.long
    assert out.loss.item() == pytest.approx(10 * -math.log(0.8) + 25 * -math.log(0.2), rel=1e-5)
    empty = torch.zeros(0, 2, requires_grad=True)
    out = PoleObjective().losses(empty, empty, text, torch.zeros(0, dtype=torch.long), 1)
    for value in (out.loss, out.otm, out.btm, out.cbs):
        assert value.shape == () and value.item() == 0.0
    assert out.fg_scores.shape == out.bg_scores.shape == (0,)
    assert out.cbs_pairs.shape == () and out.cbs_pairs.item() == 0 and out.cbs_pairs.dtype == torch.long
    out.loss.backward()  # the zero loss stays in the graph of the prompts (a training step can call backward)
    torch.testing.assert_close(text.grad, torch.zeros(2, 2))


def test_forward_with_one_map_per_image_weighs_the_terms_by_default(tiny_model):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    out = PoleObjective()(tiny_model, pixels, torch.rand(2, 4, 4), [0, 2])  # P == N: no image_indices
    assert out.fg_scores.shape == (2,)
    torch.testing.assert_close(out.loss, 10 * out.otm + 25 * out.btm + out.cbs)
    as_float = PoleObjective()(tiny_model, pixels, torch.rand(2, 4, 4), torch.tensor([0.0, 2.0]))
    assert torch.isfinite(as_float.loss)  # float class indices are read as indices
    same = PoleObjective()(tiny_model, pixels, torch.rand(2, 4, 4), [2, 2])  # one class for every map
    assert same.fg_scores.shape == (2,)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        PoleObjective()(tiny_model, pixels, torch.rand(2, 4, 4), [0, 3])


def test_forward_passes_size_and_pixel_space_masking_on(tiny_model):
    torch.manual_seed(0)
    pixels, cams, classes = torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4), torch.tensor([1, 0])
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    objective = PoleObjective()
    with torch.no_grad():
        out = objective(tiny_model, pixels, cams, classes, size=(16, 24), image_mean=mean, image_std=std)
        fg, bg = masked_images(pixels, cams, size=(16, 24), image_mean=mean, image_std=std)
        features = objective.image_features(tiny_model, torch.cat([fg, bg]))
        text = tiny_model.get_text_features()
        expected = objective.losses(features[:2], features[2:], text, classes, 3)
        torch.testing.assert_close(out.fg_scores, expected.fg_scores)
        torch.testing.assert_close(out.bg_scores, expected.bg_scores)
        for other in ({"size": (16, 24)}, {"image_mean": mean, "image_std": std}):  # each argument matters
            assert not torch.allclose(objective(tiny_model, pixels, cams, classes, **other).fg_scores, out.fg_scores)


# --- cam_network_objective ----------------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "sofa"]


def word_model(tiny_clip_dir, **options):
    from pole_hf import PolePromptModel

    options = {"template": "a photo of {}.", "learn_context": True, **options}
    return PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky", "grass"], **options)


def test_pair_maps_pick_each_pairs_map_on_the_maps_device():
    from pole_hf.cam_network_objective import pair_maps

    maps = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1)  # image i, class c: 3 i + c
    picked, images, classes = pair_maps(maps, [[2, 0], [1]])
    assert picked.flatten().tolist() == [2.0, 0.0, 4.0]
    assert images.tolist() == [0, 0, 1] and classes.tolist() == [2, 0, 1]
    _, images, classes = pair_maps(maps.to("meta"), [[2, 0], [1]])  # meta stands in for a GPU
    assert images.device.type == classes.device.type == "meta"


def test_word_features_of_words_of_unequal_lengths_are_the_plain_sentences(tiny_clip_dir, tiny_clip, tiny_tokenizer):
    from helpers import sentence_features

    from pole_hf.cam_network_objective import word_text_features

    model = word_model(tiny_clip_dir, learn_context=False)
    words = ["cat", "dining table", "a potted green plant"]
    assert len({len(tiny_tokenizer(w, add_special_tokens=False).input_ids) for w in words}) == 3
    with torch.no_grad():
        features = word_text_features(model, words)
    expected = sentence_features(tiny_clip, tiny_tokenizer, [f"a photo of {w}." for w in words])
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def test_word_features_go_through_a_changed_context_the_adapter_and_a_half_precision_clip(tiny_clip_dir):
    from pole_hf.cam_network_objective import word_text_features

    model = word_model(tiny_clip_dir, use_adapters=True)
    with torch.no_grad():
        model.prompt_learner.context.add_(0.5 * torch.randn_like(model.prompt_learner.context))
        torch.testing.assert_close(word_text_features(model, CLASSES), model.get_text_features()[:3], atol=1e-5,
                                   rtol=1e-4)
        model.clip.to(torch.bfloat16)  # the learned context and the adapters stay float32
        assert model.prompt_learner.context.dtype == torch.float32
        torch.testing.assert_close(word_text_features(model, CLASSES).float(), model.get_text_features()[:3].float())


def test_word_features_take_a_prompt_of_exactly_the_text_models_length(tiny_clip_dir):
    from pole_hf.cam_network_objective import word_text_features
    from pole_hf.prompt_learner import tokenize_word

    model = word_model(tiny_clip_dir)
    learner = model.prompt_learner
    room = model.max_text_length - (1 + len(learner.context)) - len(learner.suffix_ids)
    assert len(tokenize_word(model.tokenizer, "cat")) == 1
    with torch.no_grad():
        features = word_text_features(model, ["cat " * room, "dog"])  # the longest row fills the text model
    assert features.shape[0] == 2 and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="longer than the text model's"):
        word_text_features(model, ["cat " * (room + 1)])


def clims_losses_by_hand(model, objective, maps, pixels, labels, text, classes, num_classes):
    from pole_hf.cam_network_objective import pair_maps

    picked, images, _ = pair_maps(maps, labels)
    size = (model.clip.config.vision_config.image_size,) * 2
    fg, bg = masked_images(pixels, picked, images, size=size)
    features = objective.objective.image_features(model, torch.cat([fg, bg]))
    return PoleObjective(cbs_threshold=0.0).losses(features[: len(fg)], features[len(fg):], text, classes,
                                                   num_classes)


def test_cam_network_losses_equal_the_pole_losses_of_the_resized_masked_images(tiny_clip_dir):
    from pole_hf.cam_network_objective import CamNetworkObjective

    model = word_model(tiny_clip_dir)
    torch.manual_seed(0)
    pixels, maps, labels = torch.rand(2, 3, 48, 40), torch.rand(2, 3, 6, 5), [[0, 2], [1]]
    objective = CamNetworkObjective(cbs_threshold=0.0)
    with torch.no_grad():
        text = model.get_text_features()
        out = objective(model, maps, pixels, labels)
        expected = clims_losses_by_hand(model, objective, maps, pixels, labels, text, torch.tensor([0, 2, 1]), 3)
        for name in ("loss", "otm", "btm", "cbs", "fg_scores", "bg_scores", "cbs_pairs"):
            torch.testing.assert_close(getattr(out, name), getattr(expected, name))
        # per-pair words: the bank holds each distinct word once ("dog" twice), classes re-indexed into it
        words = [["dog", "sofa"], ["dog"]]
        out = objective(model, maps, pixels, labels, words)
        from pole_hf.cam_network_objective import word_text_features

        bank = torch.cat([word_text_features(model, ["dog", "sofa"]), text[3:]])
        expected = clims_losses_by_hand(model, objective, maps, pixels, labels, bank, torch.tensor([0, 1, 0]), 2)
        for name in ("loss", "otm", "btm", "cbs", "fg_scores", "bg_scores", "cbs_pairs"):
            torch.testing.assert_close(getattr(out, name), getattr(expected, name))
        assert out.cbs_pairs.item() == 3 * 2  # threshold 0: every (pair, background prompt) above, none of the bank
        single = objective(model, maps, pixels, [[1], []])  # exactly one pair
        assert single.fg_scores.shape == (1,) and single.loss.item() > 0
        explicit = objective(model, maps, pixels, labels, clip_size=(32, 32))
        torch.testing.assert_close(objective(model, maps, pixels, labels).loss, explicit.loss)
        other = objective(model, maps, pixels, labels, clip_size=(16, 16))
        assert not torch.isclose(other.loss, explicit.loss)


@pytest.mark.parametrize("words", [None, [[], []]], ids=["class-prompts", "pair-words"])
def test_cam_network_batch_without_labels_gives_a_zero_loss_with_zero_gradients(tiny_clip_dir, words):
    from pole_hf.cam_network_objective import CamNetworkObjective

    model = word_model(tiny_clip_dir)
    maps = torch.rand(2, 3, 6, 5, requires_grad=True)
    out = CamNetworkObjective()(model, maps, torch.rand(2, 3, 48, 40), [[], []], words)
    assert out.loss.item() == 0.0 and out.fg_scores.shape == (0,) and out.cbs_pairs.item() == 0
    out.loss.backward()
    torch.testing.assert_close(maps.grad, torch.zeros_like(maps))
    # every learning part is in the graph (a zero gradient, not none: distributed training needs them all)
    torch.testing.assert_close(model.prompt_learner.context.grad, torch.zeros_like(model.prompt_learner.context))


# --- data/voc -----------------------------------------------------------------------------------------------------


def split_folder(root, *names):
    folder = root / "ImageSets" / "Segmentation"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("x\n")
    return folder


def test_voc_split_file_picks_the_split_and_the_aug_list(tmp_path):
    from pole_hf.data.voc import _split_file

    folder = split_folder(tmp_path, "train.txt", "val.txt", "train_aug.txt", "notes.md")
    assert _split_file(str(tmp_path), "train", False) == str(folder / "train.txt")
    assert _split_file(str(tmp_path), "train", True) == str(folder / "train_aug.txt")
    assert _split_file(str(tmp_path), "val", True) == str(folder / "val.txt")  # only train has an aug list
    # the devkit's other place for the SBD list, used when ImageSets/Segmentation has none
    (folder / "train_aug.txt").unlink()
    other = tmp_path / "ImageSets" / "SegmentationAug"
    other.mkdir()
    (other / "train_aug.txt").write_text("x\n")
    assert _split_file(str(tmp_path), "train", True) == str(other / "train_aug.txt")
    (folder / "train_aug.txt").write_text("x\n")  # both: ImageSets/Segmentation first
    assert _split_file(str(tmp_path), "train", True) == str(folder / "train_aug.txt")


def test_voc_split_file_errors_name_the_missing_file_and_the_splits(tmp_path):
    from pole_hf.data.voc import _split_file

    with pytest.raises(FileNotFoundError, match="VOC split folder not found"):
        _split_file(str(tmp_path), "train", False)
    folder = split_folder(tmp_path, "val.txt", "trainval.txt", "readme.md")
    with pytest.raises(FileNotFoundError, match=r"use one of the splits \['trainval', 'val'\]"):
        _split_file(str(tmp_path), "test", False)
    (folder / "train_aug.txt").mkdir()  # a folder of that name is no list
    with pytest.raises(FileNotFoundError, match="use_aug=True needs"):
        _split_file(str(tmp_path), "train", True)


def test_voc_read_ids_skips_blank_lines_and_reads_the_path_form(tmp_path):
    from pole_hf.data.voc import _read_ids

    path = tmp_path / "ids.txt"
    path.write_text("2007_000032\n\n   \n  2007_000039  \n/JPEGImages/2008_000002.jpg /SegmentationClassAug/2008_000002.png\n")
    assert _read_ids(str(path)) == ["2007_000032", "2007_000039", "2008_000002"]


def test_voc_read_labels_sorted_unique_stripped_and_only_object_names(tmp_path):
    from pole_hf.data.voc import _read_labels

    path = tmp_path / "a.xml"
    path.write_text("<annotation><filename>a.jpg</filename>"
                    "<object><name> dog </name><part><name>hand</name></part></object>"
                    "<object><name>cat</name><difficult>1</difficult></object>"
                    "<object><name>dog</name></object></annotation>")
    assert _read_labels(str(path), {"cat": 0, "dog": 2, "person": 1}) == [0, 2]
    path.write_text("<annotation><object><name></name></object></annotation>")
    with pytest.raises(ValueError, match="Label '' in"):
        _read_labels(str(path), {"cat": 0})
    path.write_text("<annotation><object>")
    with pytest.raises(ValueError, match="not valid XML"):
        _read_labels(str(path), {"cat": 0})
    with pytest.raises(FileNotFoundError, match="is missing"):
        _read_labels(str(tmp_path / "b.xml"), {"cat": 0})


@pytest.mark.parametrize("mode", ["P", "L"])
def test_voc_labels_from_mask_reads_values_one_to_num_classes(tmp_path, mode):
    import numpy as np
    from PIL import Image

    from pole_hf.data.voc import _labels_from_mask

    values = np.array([[0, 1, 3, 255], [4, 5, 3, 1]], dtype=np.uint8)  # 0 background, 255 ignore, 5 > 4 classes
    image = Image.fromarray(values, mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        assert np.array_equal(np.asarray(image), values)
    image.save(tmp_path / "m.png")
    assert _labels_from_mask(str(tmp_path / "m.png"), 4) == [0, 2, 3]


def test_voc_root_is_the_folder_with_images_else_its_voc2012(tmp_path, monkeypatch):
    from pole_hf.data.voc import _find_voc_root

    devkit = tmp_path / "VOCdevkit"
    (devkit / "VOC2012" / "JPEGImages").mkdir(parents=True)
    assert _find_voc_root(str(devkit)) == str(devkit / "VOC2012")
    assert _find_voc_root(devkit / "VOC2012") == str(devkit / "VOC2012")  # a PathLike
    (devkit / "JPEGImages").mkdir()  # images here: this is the root, whatever lies below
    assert _find_voc_root(str(devkit)) == str(devkit)
    (tmp_path / "empty").mkdir()
    assert _find_voc_root(str(tmp_path / "empty")) == str(tmp_path / "empty")  # neither: load_voc names the gap
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _find_voc_root("~/VOCdevkit/VOC2012") == str(devkit / "VOC2012")
    with pytest.raises(FileNotFoundError, match="VOC root not found"):
        _find_voc_root(str(tmp_path / "nowhere"))


# --- prompt_learner -----------------------------------------------------------------------------------------------


def test_init_class_vectors_keep_short_words_and_average_long_ones_in_contiguous_groups():
    from pole_hf.prompt_learner import init_class_vectors

    embeds = torch.arange(5.0)[:, None].expand(5, 2)  # token i: [i, i]
    vectors, used = init_class_vectors(embeds, 2)  # 5 tokens in 2 slots: groups (0, 1, 2) and (3, 4)
    assert used == 2 and vectors[:, 0].tolist() == [1.0, 3.5]
    vectors, used = init_class_vectors(embeds[:2], 4)  # 2 tokens in 4 slots: their own, then zeros
    assert used == 2 and vectors[:, 1].tolist() == [0.0, 1.0, 0.0, 0.0]
    vectors, used = init_class_vectors(embeds[:3], 3)
    assert used == 3 and vectors[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_pad_id_rows_pads_with_the_given_id():
    from pole_hf.prompt_learner import pad_id_rows

    ids, lengths = pad_id_rows([[1, 2, 3], [4], []], 9, "cpu")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]] and lengths.tolist() == [3, 1, 0]
    assert ids.dtype == lengths.dtype == torch.long
    ids, lengths = pad_id_rows([], 9, "cpu")
    assert ids.shape == (0, 0) and lengths.shape == (0,) and lengths.dtype == torch.long
    ids, lengths = pad_id_rows([[5]], 0, "meta")  # meta stands in for a GPU
    assert ids.device.type == lengths.device.type == "meta"


def test_pole_adapter_mixes_the_mlp_and_the_input_by_the_ratio():
    from pole_hf.prompt_learner import PoleAdapter

    adapter = PoleAdapter(2)  # hidden max(1, 2 // 4) = 1
    assert adapter.fc[0].weight.shape == (1, 2) and adapter.ratio.tolist() == pytest.approx([0.2, 0.2])
    assert PoleAdapter(8).fc[0].weight.shape == (2, 8) and PoleAdapter(8, reduction=2).fc[0].weight.shape == (4, 8)
    assert PoleAdapter(8, ratio=0.5).ratio.tolist() == [0.5] * 8
    with torch.no_grad():
        adapter.fc[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        adapter.fc[2].weight.copy_(torch.tensor([[2.0], [-3.0]]))
        adapter.ratio.copy_(torch.tensor([0.25, 0.5]))
    # f = [3, 1]: A(f) = relu([2, -3] * relu(3 - 1)) = [4, 0]; f' = r A(f) + (1 - r) f = [1 + 2.25, 0 + 0.5]
    torch.testing.assert_close(adapter(torch.tensor([[3.0, 1.0]])), torch.tensor([[3.25, 0.5]]))
    half = adapter(torch.tensor([[3.0, 1.0]], dtype=torch.bfloat16))  # float32 adapter on bfloat16 features
    assert half.dtype == torch.bfloat16 and half.float().tolist() == [[3.25, 0.5]]


def test_tokenize_template_and_word(tiny_tokenizer):
    from pole_hf.prompt_learner import tokenize_template, tokenize_word

    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    words = tiny_tokenizer("a photo of", add_special_tokens=False).input_ids
    dot = tiny_tokenizer(".", add_special_tokens=False).input_ids
    assert tokenize_template(tiny_tokenizer, "a photo of {}.") == ([bos, *words], [*dot, eos])
    assert tokenize_template(tiny_tokenizer, " {} ") == ([bos], [eos])
    assert tokenize_template(tiny_tokenizer, "{}.") == ([bos], [*dot, eos])
    assert tokenize_template(tiny_tokenizer, "a photo of {}") == ([bos, *words], [eos])
    cat = tiny_tokenizer("cat", add_special_tokens=False).input_ids
    assert tokenize_word(tiny_tokenizer, "  cat ") == cat
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="has no tokens"):
            tokenize_word(tiny_tokenizer, empty)


def test_resize_class_tokens_keeps_the_leading_slots():
    from pole_hf.prompt_learner import PolePromptLearner

    learner = PolePromptLearner(2, None, 3, 1)
    with torch.no_grad():
        learner.class_tokens.copy_(torch.arange(6.0).view(2, 1, 3) + 1)
    before = learner.class_tokens
    learner.resize_class_tokens(1)
    assert learner.class_tokens is before  # same size: the same parameter (optimizers keep it)
    learner.resize_class_tokens(3)
    assert learner.class_tokens.shape == (2, 3, 3) and learner.class_tokens.requires_grad
    torch.testing.assert_close(learner.class_tokens[:, 0], before[:, 0])
    assert learner.class_tokens[:, 1:].abs().sum() == 0
    learner.class_tokens.requires_grad_(False)
    learner.resize_class_tokens(2)
    assert learner.class_tokens.shape == (2, 2, 3) and not learner.class_tokens.requires_grad
    torch.testing.assert_close(learner.class_tokens[:, 0], before[:, 0])


# --- loading ------------------------------------------------------------------------------------------------------


def id_tensors(**changes):
    tensors = {"prompt_learner.class_token_lengths": torch.tensor([1, 2]),
               "prompt_learner.background_ids": torch.tensor([[1, 5, 2, 0], [1, 2, 0, 0]]),
               "prompt_learner.background_lengths": torch.tensor([3, 2]),
               "prompt_learner.prefix_ids": torch.tensor([1, 7]), "prompt_learner.suffix_ids": torch.tensor([2]),
               "prompt_learner.class_tokens": torch.zeros(2, 2, 4)}
    tensors.update({f"prompt_learner.{k}": v for k, v in changes.items()})
    return tensors


def check_ids(tensors, classes=("cat", "dog"), background=("sky", "sea")):
    from types import SimpleNamespace

    from pole_hf.loading import _check_id_tensors

    _check_id_tensors(tensors, SimpleNamespace(class_names=list(classes), background_words=list(background)), "f")


def test_id_tensor_checks_accept_the_boundaries():
    check_ids(id_tensors())  # lengths 1 (the least), background lengths 2 (BOS, EOS) and up to the width
    check_ids(id_tensors(background_lengths=torch.tensor([4, 2])))
    check_ids(id_tensors(class_tail_lengths=torch.tensor([0, 3])))
    check_ids(id_tensors(class_token_lengths=torch.zeros(0, dtype=torch.long)), classes=())  # no classes
    check_ids(id_tensors(background_ids=torch.zeros(0, 4, dtype=torch.long),
                         background_lengths=torch.zeros(0, dtype=torch.long)), background=())
    check_ids(id_tensors(class_tail_lengths=torch.zeros(0, dtype=torch.long),
                         class_token_lengths=torch.zeros(0, dtype=torch.long)), classes=())


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"class_token_lengths": torch.tensor([1, 0])}, "class_token_lengths"),
    ({"class_token_lengths": torch.tensor([[1, 1]])}, "class_token_lengths"),
    ({"background_ids": torch.tensor([1, 2])}, "one row per background word"),
    ({"background_ids": torch.ones(3, 4, dtype=torch.long)}, "one row per background word"),
    ({"background_lengths": torch.tensor([3, 2, 2])}, "one row per background word"),
    ({"background_lengths": torch.tensor([1, 2])}, r"lie in 2\.\.4"),
    ({"background_lengths": torch.tensor([5, 2])}, r"lie in 2\.\.4"),
    ({"prefix_ids": torch.zeros(0, dtype=torch.long)}, "prefix_ids must be a non-empty"),
    ({"suffix_ids": torch.tensor([[2]])}, "suffix_ids must be a non-empty"),
    ({"class_tail_lengths": torch.tensor([0, -1])}, "class_tail_lengths"),
    ({"class_tail_lengths": torch.tensor([0])}, "class_tail_lengths"),
    ({"context": torch.tensor([[0.0, float("-inf")]])}, "context holds NaN or Inf"),
], ids=["length-0", "lengths-2d", "background-1d", "background-rows", "background-lengths-rows", "background-1",
        "background-wide", "prefix-empty", "suffix-2d", "tail-negative", "tail-rows", "context-inf"])
def test_id_tensor_checks_refuse(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_ids(id_tensors(**changes))


def test_check_base_matches_names_each_field():
    from types import SimpleNamespace

    from pole_hf.loading import check_base_matches

    def clip(width=32, vocab=100, projection=16):
        return SimpleNamespace(text_config=SimpleNamespace(hidden_size=width, vocab_size=vocab), projection_dim=projection)

    check_base_matches(clip(), clip(), "here")
    for changed, name in (({"width": 48}, "text width 32, but the base has 48"),
                          ({"vocab": 99}, "vocabulary size 100, but the base has 99"),
                          ({"projection": 8}, "projection dim 16, but the base has 8")):
        with pytest.raises(ValueError, match=f"prompts in here were learned on a CLIP with {name}"):
            check_base_matches(clip(), clip(**changed), "here")


def test_prompt_state_dict_is_everything_but_clip(tiny_model):
    from pole_hf.loading import prompt_state_dict

    state = prompt_state_dict(tiny_model)
    full = tiny_model.state_dict()
    assert set(state) == {k for k in full if not k.startswith("clip.")} and "prompt_learner.class_tokens" in state
    assert all(state[k] is full[k] or torch.equal(state[k], full[k]) for k in state)


def test_set_class_tail_pads_the_other_rows():
    from pole_hf.prompt_learner import PolePromptLearner

    learner = PolePromptLearner(3, None, 4, 1, learnable_tokens="first")
    learner.set_class_tail(1, [5, 6])
    learner.set_class_tail(2, [7])
    assert learner.class_tail_lengths.tolist() == [0, 2, 1]
    assert [row[:n] for row, n in zip(learner.class_tail_ids.tolist(), [0, 2, 1])] == [[], [5, 6], [7]]
    learner.set_class_tail(1, [])  # shorter again: the ids shrink to the longest tail
    assert learner.class_tail_ids.shape == (3, 1) and learner.class_tail_lengths.tolist() == [0, 0, 1]


def test_a_fixed_class_token_length_refuses_a_file_with_other_slots(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from pole_hf import PolePromptModel

    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky"],
                                      class_token_length=2)
    model.save_pretrained(tmp_path / "prompts")
    file = tmp_path / "prompts" / "model.safetensors"
    tensors = load_file(file)
    tensors["prompt_learner.class_tokens"] = torch.zeros(3, 3, tensors["prompt_learner.class_tokens"].shape[-1])
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"class_tokens has shape \(3, 3, "):
        PolePromptModel.from_pretrained(tmp_path / "prompts")


def saved_prompt_tensors(model, tmp_path):
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "prompts")
    return tmp_path / "prompts" / "model.safetensors", load_file(tmp_path / "prompts" / "model.safetensors")


def test_prompt_ids_of_another_integer_dtype_load_as_long_and_float_or_bool_ids_are_refused(tiny_clip_dir,
                                                                                             tmp_path):
    from safetensors.torch import save_file

    from pole_hf import PolePromptModel
    from pole_hf.loading import load_prompt_tensors

    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky"])
    file, tensors = saved_prompt_tensors(model, tmp_path)
    save_file({k: v.to(torch.int32) if not v.is_floating_point() else v for k, v in tensors.items()}, file)
    fresh = PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky"])
    load_prompt_tensors(fresh, str(file))
    learner = fresh.prompt_learner
    for name in ("prefix_ids", "suffix_ids", "class_token_lengths", "background_ids", "background_lengths"):
        assert getattr(learner, name).dtype == torch.long, name
        assert torch.equal(getattr(learner, name), tensors[f"prompt_learner.{name}"]), name
    for dtype in (torch.float32, torch.bool):
        save_file({**tensors, "prompt_learner.prefix_ids": tensors["prompt_learner.prefix_ids"].to(dtype)}, file)
        with pytest.raises(ValueError, match=rf"prefix_ids has dtype {dtype}, expected integer token ids"):
            load_prompt_tensors(fresh, str(file))


def test_a_learned_context_takes_the_files_length(tiny_clip_dir, tmp_path):
    """The context follows the file's template prefix, not the receiving model's."""
    from pole_hf import PolePromptModel
    from pole_hf.loading import load_prompt_tensors

    short = PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky"],
                                      template="a {}.", learn_context=True)
    with torch.no_grad():
        short.prompt_learner.context.normal_()
    file, tensors = saved_prompt_tensors(short, tmp_path)
    long = PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky"],
                                     learn_context=True)
    assert long.prompt_learner.context.shape[0] != short.prompt_learner.context.shape[0]
    load_prompt_tensors(long, str(file))
    assert torch.equal(long.prompt_learner.context, short.prompt_learner.context)
    assert torch.equal(long.prompt_learner.prefix_ids, short.prompt_learner.prefix_ids)


def test_loaded_prompt_tensors_land_on_the_models_device(tiny_clip_dir, tmp_path):
    """Ids and context go where the class tokens live (the meta device stands in for a GPU)."""
    from pole_hf import PolePromptModel
    from pole_hf.loading import load_prompt_tensors

    model = PolePromptModel.from_clip(tiny_clip_dir, class_names=CLASSES, background_words=["sky"],
                                      learn_context=True)
    file, _ = saved_prompt_tensors(model, tmp_path)
    model.prompt_learner.to("meta")
    load_prompt_tensors(model, str(file))
    learner = model.prompt_learner
    assert learner.context.device.type == "meta" and learner.prefix_ids.device.type == "meta"
    assert {getattr(learner, n).device.type for n in ("suffix_ids", "class_token_lengths", "background_ids")} == {
        "meta"}


def test_class_prompt_embeddings_of_untouched_words_are_the_sentences_tokens(tiny_model, tiny_tokenizer):
    """Length and content: the longest prompt fills the tensor exactly, the EOS positions are the sentences'."""
    clip, learner = tiny_model.clip, tiny_model.prompt_learner
    embedding = clip.text_model.embeddings.token_embedding
    embeds, eos = learner.class_prompt_embeddings(embedding)
    sentences = [tiny_model.config.template.format(name) for name in tiny_model.config.class_names]
    ids = [tiny_tokenizer(s).input_ids for s in sentences]
    assert embeds.shape[:2] == (len(ids), max(map(len, ids)))
    assert eos.tolist() == [len(row) - 1 for row in ids]
    for row, sentence_ids in zip(embeds, ids):
        torch.testing.assert_close(row[: len(sentence_ids)], embedding(torch.tensor(sentence_ids)), atol=0, rtol=0)
