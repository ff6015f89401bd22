"""The CAM engine against an independent, straightforward GradCAM; geometry, CAA, multi-scale."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import eager_attention
from PIL import Image

from pole_hf import image_cams
from pole_hf._clip_internals import clip_es_position_embeddings, vision_prefix
from pole_hf.caa import affinity_from_attention, box_mask, label_regions, minmax


def grid_cams(model, pixels, targets, **options):
    """One image's grid CAMs, class indices and scores from the model's batched output."""
    out = model.get_cams(pixels, None if targets is None else [list(targets)], **options)
    keep = out.cam_classes[0] >= 0
    return out.cams[0][keep], out.cam_classes[0][keep], out.cam_scores[0][keep]


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """1-D bilinear resize as a matrix, half-pixel centres, edges clamped (OpenCV's / align_corners=False)."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        src = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(np.floor(src)), size_in - 1)
        high = min(low + 1, size_in - 1)
        matrix[i, low] += 1 - (src - low)
        matrix[i, high] += src - low
    return matrix


def reference_position_table(weight: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """CLIP-ES's position embeddings rebuilt with numpy: bilinear patch grid, whole table rounded to fp16."""
    table = weight.detach().double().numpy()
    side = int(round((len(table) - 1) ** 0.5))
    grid = table[1:].reshape(side, side, -1)
    resized = np.einsum("ys,xt,std->yxd", bilinear_matrix(side, grid_h), bilinear_matrix(side, grid_w), grid)
    out = np.concatenate([table[:1], resized.reshape(grid_h * grid_w, -1)]).astype(np.float16).astype(np.float32)
    return torch.from_numpy(out)


def clip_es_minmax(maps: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image: (x - min) / (1e-7 + max(x - min))."""
    flat = maps.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    return (flat / (1e-7 + flat.max(1, keepdim=True).values)).view_as(maps)


def straightforward_gradcam(model, pixels, targets, clip_es_positions=False):
    """GradCAM the plain way: a full forward per class with a hook on the last block's layer_norm1, own backward;
    normalised twice as CLIP-ES; with `clip_es_positions` the position table is [`reference_position_table`]."""
    clip = model.clip
    embeddings = clip.vision_model.embeddings
    if clip_es_positions:
        table = reference_position_table(embeddings.position_embedding.weight, pixels.shape[-2] // 8,
                                         pixels.shape[-1] // 8)
        embeddings.interpolate_pos_encoding = lambda *args: table[None]
    store = {}
    hook = clip.vision_model.encoder.layers[-1].layer_norm1.register_forward_hook(
        lambda module, inputs, output: store.__setitem__("act", output))
    with torch.no_grad():
        text = model.get_text_features()
    num_classes = model.config.num_classes
    softmax_set = list(targets) + list(range(num_classes, text.shape[0]))
    maps = []
    try:
        for position in range(len(targets)):
            with torch.enable_grad():
                leaf = pixels.clone().requires_grad_(True)
                tokens = clip.vision_model(pixel_values=leaf, interpolate_pos_encoding=True).last_hidden_state
                feature = clip.visual_projection(clip.vision_model.post_layernorm(tokens[:, 1:]).mean(1))
                logits = clip.logit_scale.exp() * F.normalize(feature, dim=-1) @ text.t()
                prob = logits[0, softmax_set].softmax(-1)[position]
                grad = torch.autograd.grad(prob, store["act"])[0][0, 1:]
            act = store["act"][0, 1:].detach()
            cam = torch.relu(act @ grad.mean(0))
            maps.append(cam)
    finally:
        hook.remove()
        embeddings.__dict__.pop("interpolate_pos_encoding", None)
    h, w = pixels.shape[-2] // 8, pixels.shape[-1] // 8
    return clip_es_minmax(clip_es_minmax(torch.stack(maps))).view(len(targets), h, w)


@pytest.mark.parametrize("positions", ["clip_es", "bicubic"])
@pytest.mark.parametrize("size", [(32, 32), (40, 56), (64, 24)])
def test_engine_matches_straightforward_gradcam(tiny_model, size, positions):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, *size)
    cams, indices, probs = grid_cams(tiny_model, pixels, [2, 0], **(
        {} if positions == "clip_es" else {"position_embedding": "bicubic"}))
    reference = straightforward_gradcam(tiny_model, pixels, [2, 0], clip_es_positions=positions == "clip_es")
    assert indices.tolist() == [2, 0]
    torch.testing.assert_close(cams, reference, atol=1e-4, rtol=0)
    assert torch.allclose(cams.amax(dim=(1, 2)), torch.ones(2)) and cams.min() >= 0
    assert probs.shape == (2,) and 0 < probs.sum() < 1


def test_single_class_still_has_a_gradient(tiny_model):
    cams, _, probs = grid_cams(tiny_model, torch.randn(1, 3, 32, 32), [1])
    assert probs.item() < 1.0  # background words share the softmax
    assert cams.max() > 0.99


def test_predicted_targets_without_labels(tiny_model):
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # forward works under no_grad (the pipelines call it so)
        output = tiny_model(pixels)
        logits = torch.cat([output.logits, output.background_logits], 1)[0]
    expected = torch.nonzero(logits.softmax(-1)[:3] >= tiny_model.config.prediction_threshold).flatten().tolist()
    _, indices, _ = grid_cams(tiny_model, pixels, None)
    assert output.cam_classes[0].tolist() == indices.tolist()
    assert indices.tolist() == (expected or [int(logits[:3].argmax())])


@pytest.mark.parametrize("size", [(53, 37), (375, 500)])
def test_maps_come_back_at_the_input_size(tiny_model, tiny_processor, random_image, size):
    height, width = size
    output = image_cams(tiny_model, tiny_processor, random_image(0, height, width), [0, 1], max_side=128)
    assert output.cams.shape == (2, height, width) and output.cams.dtype == torch.float32
    grid_h, grid_w = output.grid_cams.shape[1:]
    scale = min(1.0, 128 / max(height, width))
    assert (grid_h, grid_w) == (int(np.ceil(height * scale / 8)), int(np.ceil(width * scale / 8)))
    assert torch.isfinite(output.cams).all() and output.cams.max() <= 1.0


def test_flip_and_scales_average(tiny_model, tiny_processor, random_image):
    image = random_image(1, 40, 48)
    single = image_cams(tiny_model, tiny_processor, image, [0]).cams
    flipped = image_cams(tiny_model, tiny_processor, image.transpose(Image.FLIP_LEFT_RIGHT), [0]).cams.flip(-1)
    both = image_cams(tiny_model, tiny_processor, image, [0], flip=True).cams
    torch.testing.assert_close(both, (single + flipped) / 2, atol=1e-5, rtol=0)
    multi = image_cams(tiny_model, tiny_processor, image, [0], scales=(1.0, 1.5)).cams
    assert multi.shape == single.shape and not torch.allclose(multi, single)


def test_all_black_image_gives_defined_maps(tiny_model, tiny_processor):
    output = image_cams(tiny_model, tiny_processor, Image.new("RGB", (32, 32)), [0, 2], refine=True)
    assert torch.isfinite(output.cams).all()


def test_affinity_is_symmetric_and_refinement_stays_in_boxes(tiny_model):
    attention = torch.rand(12, 12).softmax(-1)
    affinity = affinity_from_attention(attention)
    torch.testing.assert_close(affinity, affinity.t(), atol=1e-5, rtol=0)
    cam = torch.zeros(1, 4, 3)
    cam[0, 0, 0] = 1.0
    assert box_mask(cam[0].numpy()).sum() == 1
    cams, _, _ = grid_cams(tiny_model, torch.randn(1, 3, 32, 40), [0, 1], refine=True)
    assert cams.shape == (2, 4, 5) and torch.isfinite(cams).all() and cams.max() > 0.99


def flood_fill_boxes(above: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (y0, x0, y1, x1 inclusive) of 8-connected regions, by breadth-first flood fill."""
    from collections import deque

    seen = np.zeros_like(above, bool)
    boxes = []
    for start in zip(*np.nonzero(above)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < above.shape[0] and 0 <= nx < above.shape[1] and above[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        ys, xs = zip(*members)
        boxes.append((min(ys), min(xs), max(ys), max(xs)))
    return boxes


def clip_es_box_mask(cam: np.ndarray, threshold: float = 0.4, full: bool = False) -> np.ndarray:
    """scoremap2bbox + the aff_mask slicing of CLIP-ES, written out: uint8 map, strict >, boxes [y0:y1, x0:x1)
    with x1 = min(x0 + w, W - 1), y1 = min(y0 + h, H - 1)."""
    height, width = cam.shape
    scaled = (cam.astype(np.float32) * 255).astype(np.uint8)
    above = scaled > int(threshold * np.max(scaled))
    mask = np.zeros(cam.shape, bool)
    for y0, x0, y1, x1 in flood_fill_boxes(above):
        if full:
            mask[y0:y1 + 1, x0:x1 + 1] = True
        else:
            mask[y0:min(y1 + 1, height - 1), x0:min(x1 + 1, width - 1)] = True
    return mask


def test_box_rule_matches_clip_es_written_out():
    rng = np.random.default_rng(0)
    for trial in range(150):
        height, width = rng.integers(1, 14, 2)
        cam = rng.random((height, width)).astype(np.float32) ** rng.uniform(1, 6)
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
        for full in (False, True):
            expected = clip_es_box_mask(cam, full=full)
            np.testing.assert_array_equal(box_mask(cam, 0.4, "full" if full else "clip_es"), expected, str(trial))
        labels = label_regions(cam > 0.5)
        assert len({int(v) for v in labels[labels >= 0]}) == len(flood_fill_boxes(cam > 0.5))


def test_box_rule_is_8_connected_strict_and_drops_the_last_row_and_column():
    grid = np.zeros((6, 6), dtype=np.float32)
    grid[0, 0] = grid[1, 1] = 1.0  # diagonal neighbours: one 8-connected region, one 2x2 box
    grid[3, 3] = 0.4  # uint8 101 is not > int(0.4 * 255) = 102: outside
    mask = box_mask(grid, 0.4)
    assert mask[:2, :2].all() and mask.sum() == 4
    edge = np.zeros((4, 5), dtype=np.float32)
    edge[1:, 2:] = 1.0  # a region touching the last row and column
    assert box_mask(edge, 0.4).sum() == 2 * 2  # rows 1..2, columns 2..3: last row and column never inside
    assert box_mask(edge, 0.4, box_edges="full").sum() == 3 * 3
    corner = np.zeros((3, 3), dtype=np.float32)
    corner[2, 2] = 1.0  # only in the last row/column: CLIP-ES's box is empty
    assert box_mask(corner).sum() == 0 and box_mask(corner, box_edges="full").sum() == 1
    with pytest.raises(ValueError, match="box_edges"):
        box_mask(corner, box_edges="inclusive")


@pytest.mark.parametrize("grid", [(7, 7), (3, 5), (19, 4), (10, 13)])
def test_clip_es_position_embeddings_are_bilinear_then_fp16(grid):
    weight = torch.randn(1 + 49, 16)
    table = clip_es_position_embeddings(weight, *grid)
    reference = reference_position_table(weight, *grid)
    torch.testing.assert_close(table, reference, atol=1e-6, rtol=1e-3)  # at most one fp16 step apart
    assert (table != reference).float().mean() < 0.02  # ... where float32 and float64 round differently
    assert torch.equal(table, table.half().float())  # representable in fp16, the native 7x7 grid too
    assert not torch.equal(clip_es_position_embeddings(weight, 7, 7), weight)


def test_minmax_uses_clip_es_epsilon():
    low_range = torch.tensor([[[0.0, 1e-6]]])
    torch.testing.assert_close(minmax(low_range), torch.tensor([[[0.0, 1e-6 / (1e-6 + 1e-7)]]]))


def test_76_patch_input_works(tiny_model):
    """CLIP-ES's text/vision switch on 77 tokens crashes here; the engine takes 19 x 4 patches (152 x 32 px)."""
    cams, _, _ = grid_cams(tiny_model, torch.randn(1, 3, 32, 152), [0, 1], refine=True)
    assert cams.shape == (2, 4, 19) and torch.isfinite(cams).all()


def test_minmax_constant_map_is_zero():
    maps = minmax(torch.ones(2, 3, 3))
    assert torch.count_nonzero(maps) == 0


def test_images_smaller_than_a_patch_are_refused(tiny_model, tiny_processor):
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        image_cams(tiny_model, tiny_processor, Image.new("RGB", (7, 30)), [0])


def test_caa_attention_from_the_forward_equals_a_second_pass(tiny_model):
    """The refined maps use the attention the forward computed; a separate pass over HF's (eager) layers agrees."""
    from pole_hf.caa import refine_with_affinity

    clip = tiny_model.clip
    clip.set_attn_implementation("eager")  # the engine's explicit attention, op for op
    layers = clip.vision_model.encoder.layers
    pixels = torch.randn(1, 3, 40, 48)
    probs, inputs = eager_attention(clip, pixels)
    # the blocks before the last: their outputs and their attention, from one pass
    hidden, attention = vision_prefix(clip.vision_model, pixels, caa_layers=len(layers), position_embedding="bicubic")
    torch.testing.assert_close(hidden, inputs[-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(attention[0], sum(probs[:-1]), atol=1e-6, rtol=0)
    raw, _, _ = grid_cams(tiny_model, pixels, [0, 2], position_embedding="bicubic")
    refined, _, _ = grid_cams(tiny_model, pixels, [0, 2], refine=True, position_embedding="bicubic")
    affinity = affinity_from_attention(torch.stack(probs[-8:]).mean(0)[1:, 1:])
    # float32 reordering (1e-6 in the raw maps) grows a little through the refined maps' min-max
    torch.testing.assert_close(refined, refine_with_affinity(raw, affinity), atol=1e-4, rtol=0)
    assert not torch.allclose(refined, raw, atol=1e-2)


def test_refinement_without_the_squared_affinity_is_the_same():
    from pole_hf.caa import refine_with_affinity, refine_with_transition, transition_from_attention

    torch.manual_seed(0)
    attention = (torch.randn(30, 30) * 3).softmax(-1)
    cams = minmax(torch.rand(3, 5, 6) ** 3)
    expected = refine_with_affinity(cams, affinity_from_attention(attention))
    torch.testing.assert_close(refine_with_transition(cams, transition_from_attention(attention)), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["patch_mean", "pooled"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_written_out_backward_equals_autograd_through_the_last_block(tiny_model, kind, activation):
    """GradCAM weights (mean over patch tokens of the gradient at layer_norm1's output) of several images and
    cotangents at once, against autograd through transformers' own last layer and the head."""
    from transformers.activations import ACT2FN

    from pole_hf._clip_internals import pool_tokens
    from pole_hf._last_block_backward import gradcam_weights, last_block_forward

    clip = tiny_model.clip
    vision = clip.vision_model
    layer = vision.encoder.layers[-1]
    saved = layer.mlp.activation_fn
    layer.mlp.activation_fn = ACT2FN[activation]
    try:
        torch.manual_seed(3)
        hidden, _ = vision_prefix(vision, torch.randn(2, 3, 40, 56))
        cotangents = torch.randn(3, 2, vision.config.hidden_size)
        state = last_block_forward(vision, hidden)
        weights, probs = gradcam_weights(vision, state, cotangents, kind, attention=True)
        store = {}

        def leaf_hook(module, inputs, output):
            store["act"] = output.detach().requires_grad_(True)
            return store["act"]

        hook = layer.layer_norm1.register_forward_hook(leaf_hook)
        try:
            with torch.enable_grad():
                tokens = layer(hidden, None)
                pooled = pool_tokens(clip, tokens, kind)
                expected = torch.stack([torch.autograd.grad(pooled, store["act"], g, retain_graph=True)[0][:, 1:]
                                        .mean(1) for g in cotangents])
        finally:
            hook.remove()
        torch.testing.assert_close(state.tokens, tokens.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-4)
        assert weights.abs().amax() > 1e-3  # not a trivially zero gradient
        attn = layer.self_attn
        heads = [x.view(2, -1, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (state.q, state.k)]
        torch.testing.assert_close(probs, (heads[0] @ heads[1].transpose(-1, -2) * attn.scale).softmax(-1).mean(1))
    finally:
        layer.mlp.activation_fn = saved


def test_backward_runs_only_on_real_targets_and_equals_the_padded_batch(tiny_model, monkeypatch):
    """With `counts`, an image with fewer targets than the batch's most runs its backward alone on its own targets:
    the weights equal the padded batch's (where a padded slot's zero cotangent gives zero weights), padding costs
    no backward, and the CAMs (CAA included) equal the padded engine's to 1e-6."""
    import pole_hf._last_block_backward as backward
    from pole_hf import cam

    vision = tiny_model.clip.vision_model
    torch.manual_seed(5)
    hidden, _ = vision_prefix(vision, torch.randn(3, 3, 40, 56))
    counts = [1, 3, 0]
    cotangents = torch.randn(3, 3, vision.config.hidden_size)
    for row, count in enumerate(counts):
        cotangents[count:, row] = 0  # padding, as the engine's cotangents
    state = backward.last_block_forward(vision, hidden)
    padded, padded_probs = backward.gradcam_weights(vision, state, cotangents, "patch_mean", attention=True)
    slots = []
    real = backward._weights
    monkeypatch.setattr(backward, "_weights", lambda v, s, g, *a: slots.append(g.shape[:2]) or real(v, s, g, *a))
    weights, probs = backward.gradcam_weights(vision, state, cotangents, "patch_mean", attention=True, counts=counts)
    assert slots == [(1, 1), (3, 1)]  # 4 real targets, not 3 x 3 slots
    torch.testing.assert_close(weights, padded, atol=1e-6, rtol=0)
    assert weights[1:, 0].abs().sum() == 0 and weights[:, 2].abs().sum() == 0
    torch.testing.assert_close(probs[:2], padded_probs[:2], atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="counts has 2 entries for a batch of 3"):
        backward.gradcam_weights(vision, state, cotangents, "patch_mean", counts=[1, 3])
    with pytest.raises(ValueError, match="negative entry"):
        backward.gradcam_weights(vision, state, cotangents, "patch_mean", counts=[1, -1, 3])
    monkeypatch.setattr(backward, "_weights", real)
    pixels = torch.randn(3, 3, 40, 56)
    targets = [[2], [0, 1, 2], [1]]
    new = [cam.gradcam(tiny_model, pixels, targets, refine=refine) for refine in (False, True)]
    whole = backward.gradcam_weights
    monkeypatch.setattr(cam, "gradcam_weights", lambda *a, counts=None, **k: whole(*a, **k))  # the padded engine
    old = [cam.gradcam(tiny_model, pixels, targets, refine=refine) for refine in (False, True)]
    torch.testing.assert_close(new[0].cams, old[0].cams, atol=1e-6, rtol=0)
    torch.testing.assert_close(new[0].cam_scores, old[0].cam_scores, atol=0, rtol=0)
    # CAA on a random CLIP's near-flat maps amplifies float reordering (as batched against single images)
    torch.testing.assert_close(new[1].cams, old[1].cams, atol=1e-4, rtol=0)


def test_images_with_equal_target_counts_share_one_backward(tiny_model, monkeypatch):
    """The padded-slot skip groups images by their number of targets: one batched backward per distinct count
    (what a GPU batch needs), with the same weights as the padded batch."""
    import pole_hf._last_block_backward as backward

    vision = tiny_model.clip.vision_model
    torch.manual_seed(6)
    hidden, _ = vision_prefix(vision, torch.randn(4, 3, 40, 56))
    counts = [2, 1, 2, 1]
    cotangents = torch.randn(2, 4, vision.config.hidden_size)
    for row, count in enumerate(counts):
        cotangents[count:, row] = 0
    state = backward.last_block_forward(vision, hidden)
    padded, padded_probs = backward.gradcam_weights(vision, state, cotangents, "pooled", attention=True)
    calls, real = [], backward._weights
    monkeypatch.setattr(backward, "_weights",
                        lambda v, s, g, *a: calls.append(tuple(g.shape[:2])) or real(v, s, g, *a))
    weights, probs = backward.gradcam_weights(vision, state, cotangents, "pooled", attention=True, counts=counts)
    assert calls == [(1, 2), (2, 2)]  # images 1, 3 with one target; images 0, 2 with two
    torch.testing.assert_close(weights, padded, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, padded_probs, atol=1e-7, rtol=0)
