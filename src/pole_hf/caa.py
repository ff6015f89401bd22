"""Class-aware attention affinity (CAA, CLIP-ES): boxes around each CAM's strong regions, an affinity from the
ViT's attention, and the refined map ``A_c @ cam_c``.

The box rule reproduces CLIP-ES's ``scoremap2bbox`` (``utils.py``) without OpenCV: the map is cast to uint8
(``(cam * 255)`` truncated), thresholded with a strict ``>`` at ``int(threshold * max)``, split into 8-connected
regions (as ``cv2.findContours`` traces them), and each region's bounding box is filled. CLIP-ES clips a box's end
to ``W - 1`` / ``H - 1`` and slices half-open, so the grid's last row and column are never inside a box
(``box_edges="clip_es"``, the default); ``box_edges="full"`` fills the whole box.
"""

from __future__ import annotations

import numpy as np
import torch

BOX_THRESHOLD = 0.4
SINKHORN_ROUNDS = 3
BOX_EDGES = ("clip_es", "full")


def minmax(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """CLIP-ES's min-max normalisation of each map of ``[k, ...]``: ``(x - min) / (max - min + eps)``.

    A constant map becomes zeros; a map of small range is still stretched to (almost) 1.
    """
    flat = maps.flatten(1)
    low = flat.min(1, keepdim=True).values
    shifted = flat - low
    return (shifted / (shifted.max(1, keepdim=True).values + eps)).view_as(maps)


def label_regions(mask: np.ndarray) -> np.ndarray:
    """8-connected labelling of a boolean ``[H, W]`` map: each region's pixels get the flat index of one of its
    pixels, background pixels ``-1``. Numpy only (neighbour-minimum propagation with pointer jumping)."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    labels = np.where(mask, np.arange(height * width).reshape(height, width), -1)
    big = height * width
    while True:
        padded = np.pad(np.where(mask, labels, big), 1, constant_values=big)
        neighbours = np.stack([padded[dy: dy + height, dx: dx + width] for dy in range(3) for dx in range(3)])
        smallest = np.where(mask, neighbours.min(0), -1)
        flat = smallest.ravel()
        inside = flat >= 0
        flat[inside] = flat[flat[inside]]  # pointer jumping: follow the label of the label
        if np.array_equal(smallest, labels):
            return labels
        labels = smallest


def region_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Inclusive bounding boxes ``(y0, x0, y1, x1)`` of the 8-connected regions of a boolean map."""
    labels = label_regions(mask)
    ys, xs = np.nonzero(labels >= 0)
    if not len(ys):
        return []
    ids, inverse = np.unique(labels[ys, xs], return_inverse=True)
    boxes = np.empty((len(ids), 4), dtype=np.int64)
    boxes[:, 0], boxes[:, 1] = ys.max() + 1, xs.max() + 1
    boxes[:, 2:] = -1
    np.minimum.at(boxes[:, 0], inverse, ys)
    np.minimum.at(boxes[:, 1], inverse, xs)
    np.maximum.at(boxes[:, 2], inverse, ys)
    np.maximum.at(boxes[:, 3], inverse, xs)
    return [tuple(int(v) for v in box) for box in boxes]


def box_mask(grid_cam: np.ndarray, threshold: float = BOX_THRESHOLD, box_edges: str = "clip_es") -> np.ndarray:
    """Union of the boxes of the 8-connected regions where ``uint8(cam * 255) > int(threshold * max)``.

    Args:
        grid_cam: one map ``[h, w]`` in [0, 1].
        threshold: fraction of the uint8 map's maximum.
        box_edges: ``"clip_es"`` (box ends clipped to ``w - 1`` / ``h - 1``, sliced half-open: the last row and
            column are never inside) or ``"full"`` (each region's whole bounding box).
    """
    if box_edges not in BOX_EDGES:
        raise ValueError(f"box_edges must be one of {BOX_EDGES}, got {box_edges!r}")
    height, width = grid_cam.shape
    scaled = np.clip(np.asarray(grid_cam, dtype=np.float32) * 255, 0, 255).astype(np.uint8)
    above = scaled > int(threshold * scaled.max())
    mask = np.zeros((height, width), dtype=bool)
    for y0, x0, y1, x1 in region_boxes(above):
        if box_edges == "clip_es":
            mask[y0: min(y1 + 1, height - 1), x0: min(x1 + 1, width - 1)] = True
        else:
            mask[y0: y1 + 1, x0: x1 + 1] = True
    return mask


def transition_from_attention(attention: torch.Tensor, rounds: int = SINKHORN_ROUNDS) -> torch.Tensor:
    """CLIP-ES's symmetric transition matrix (float64) from patch attention ``[N, N]``: alternate column/row
    normalisation (``rounds`` times), then symmetrise. Its square is [`affinity_from_attention`]. Works in place
    on a copy: two ``[N, N]`` matrices at most."""
    transition = attention.to(torch.float64, copy=True)
    for _ in range(rounds):
        transition.div_(transition.sum(0, keepdim=True))
        transition.div_(transition.sum(1, keepdim=True))
    return transition.add_(transition.t().clone()).div_(2)


def affinity_from_attention(attention: torch.Tensor, rounds: int = SINKHORN_ROUNDS) -> torch.Tensor:
    """CLIP-ES's class-agnostic affinity from patch attention ``[N, N]``: the transition matrix squared (one
    random-walk step), float32."""
    transition = transition_from_attention(attention, rounds)
    return (transition @ transition).float()


def _box_keep(grid_cams: torch.Tensor, threshold: float, box_edges: str) -> torch.Tensor:
    """``[k, N]`` 0/1 masks of each map's CAA boxes."""
    return torch.stack([torch.from_numpy(box_mask(cam.detach().cpu().numpy(), threshold, box_edges)).flatten()
                        for cam in grid_cams]).to(grid_cams.device)


def refine_with_affinity(grid_cams: torch.Tensor, affinity: torch.Tensor, threshold: float = BOX_THRESHOLD,
                         box_edges: str = "clip_es") -> torch.Tensor:
    """Class-aware affinity refinement: per class, keep affinity columns inside its CAM boxes; ``A_c @ cam_c``,
    then one [`minmax`] (as CLIP-ES)."""
    k, height, width = grid_cams.shape
    keep = _box_keep(grid_cams, threshold, box_edges).to(affinity.dtype)
    refined = torch.stack([(affinity * row[None, :]) @ cam.flatten().to(affinity.dtype)
                           for row, cam in zip(keep, grid_cams)])
    return minmax(refined.view(k, height, width).float())


def refine_with_transition(grid_cams: torch.Tensor, transition: torch.Tensor, threshold: float = BOX_THRESHOLD,
                           box_edges: str = "clip_es") -> torch.Tensor:
    """[`refine_with_affinity`] without forming the affinity: masking the affinity's columns is masking the map,
    so ``(T @ T * keep_c) @ cam_c = T @ (T @ (keep_c * cam_c))``: two matrix products with ``[N, k]``, O(N^2 k)
    instead of O(N^3)."""
    k, height, width = grid_cams.shape
    keep = _box_keep(grid_cams, threshold, box_edges).to(transition.dtype)
    masked = (keep * grid_cams.flatten(1).to(transition.dtype)).t()  # [N, k]
    refined = (transition @ (transition @ masked)).t()
    return minmax(refined.reshape(k, height, width).float())
