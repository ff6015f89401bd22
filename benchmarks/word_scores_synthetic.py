"""How much the class word moves CLIMS's objective on the bundled tiny CLIP (the synthetic world).

    python benchmarks/word_scores_synthetic.py --num_images 200

POLE's gain over CLIMS in the CAM-network route can only come from the class words changing the frozen CLIP's
scores of the masked images. This measures that directly, with ground-truth masks (no network involved): for every
class and candidate word, the mean cosine between the word's prompt (`'a photo of {}.'`) and CLIP's pooled feature
of the object-masked image (`mask * x`, own class), of the object-removed image (`(1 - mask) * x`), and of other
classes' object-masked images, and the zero-shot accuracy among the eight classes when the class uses that word
(the others their frequent word). Then CLIMS's loss (10 OTM + 25 BTM + 1 CBS) of the ground-truth masks and of
all-ones masks with each word set: the objective's preference for the right masks. Writes the table into
benchmarks/README.md under "## Class words and CLIMS's scores (tiny CLIP)".
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_synthetic import README, replace_section  # noqa: E402
from synthetic_args import parse_benchmark_args  # noqa: E402

HEADING = "## Class words and CLIMS's scores (tiny CLIP)"
GRID = 8
FREE_LR = 0.05


def free_masks(objective, model, pixels, truth, labels, pair_words, steps: int, images: int = 64):
    """Optimise free per-pair mask logits from the ground truth on CLIMS's loss; `(step, loss, IoU, mean)` rows."""
    pixels, truth, labels = pixels[:images], truth[:images], labels[:images]
    pair_words = None if pair_words is None else pair_words[:images]
    target = truth > 0.5
    pooled = torch.nn.functional.adaptive_avg_pool2d(truth, GRID).clamp(1e-3, 1 - 1e-3)
    logits = torch.logit(pooled).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=FREE_LR)
    rows, owned = [], torch.zeros(truth.shape[:2], dtype=torch.bool)
    for i, classes in enumerate(labels):
        owned[i, classes] = True
    for step in range(steps + 1):
        maps = torch.sigmoid(logits)
        loss = objective(model, maps, pixels, labels, pair_words).loss
        if step % max(1, steps // 4) == 0:
            with torch.no_grad():
                up = torch.nn.functional.interpolate(maps, size=truth.shape[-2:], mode="bilinear") > 0.5
                inter = (up & target)[owned].flatten(1).sum(1).float()
                union = (up | target)[owned].flatten(1).sum(1).float().clamp(min=1)
                rows.append((step, float(loss), float((inter / union).mean()), float(maps[owned].mean())))
        if step < steps:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return rows


def main(argv=None):
    args = parse_benchmark_args(__doc__.splitlines()[0], num_images=200, argv=argv,
                                extra=lambda parser: parser.add_argument("--steps", type=int, default=100))
    from pole_hf import PolePromptModel
    from pole_hf.bundled import TINY_CLIP
    from pole_hf.cam_network_objective import CamNetworkObjective, pair_maps, variant_options, word_text_features
    from pole_hf.cam_network_training import normalise
    from pole_hf.data import SyntheticWorld, load_synthetic
    from pole_hf.image_processing_pole import PoleImageProcessor
    from pole_hf.objective import masked_images

    start = time.time()
    world = SyntheticWorld()
    names = world.class_names
    model = PolePromptModel.from_clip(TINY_CLIP, class_names=names, background_words=world.background_kinds,
                                      **variant_options("clims")).eval()
    processor = PoleImageProcessor.for_model(model)
    size = model.clip.config.vision_config.image_size
    data = load_synthetic(num_images=args.num_images, seed=args.seed, image_size=size, split="train")
    pixels = torch.stack([torch.from_numpy(np.asarray(e["image"], np.float32) / 255).permute(2, 0, 1) for e in data])
    pixels = normalise(pixels, processor.image_mean, processor.image_std)
    masks = torch.stack([torch.from_numpy(np.asarray(e["mask"], np.int64)) for e in data])
    labels = [sorted(set(e["labels"])) for e in data]
    truth = torch.stack([(masks == c + 1).float() for c in range(len(names))], dim=1)  # [N, C, H, W]
    objective = CamNetworkObjective()  # POLE's weights, 10 / 25 / 1
    words = [w for candidates in world.candidates.values() for w in candidates]
    with torch.no_grad():
        text = word_text_features(model, words)
        maps, images, classes = pair_maps(truth, labels)
        fg, bg = masked_images(pixels, maps, images)
        features = objective.objective.image_features(model, torch.cat([fg, bg]))
    pairs = len(classes)
    fg_features, bg_features = features[:pairs], features[pairs:]
    frequent = [words.index(world.frequent_word(c)) for c in range(len(names))]
    head = ("| class | word | caption share | fg cos (own) | bg cos | fg cos (other classes) | fg - bg | "
            "zero-shot accuracy |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c, (name, candidates) in enumerate(world.candidates.items()):
        share = dict(world.words[name])
        for word in candidates:
            t = text[words.index(word)]
            own, other = fg_features[classes == c] @ t, fg_features[classes != c] @ t
            back = bg_features[classes == c] @ t
            bank = torch.stack([t if k == c else text[frequent[k]] for k in range(len(names))])
            accuracy = ((fg_features[classes == c] @ bank.T).argmax(-1) == c).float().mean()
            lines.append(f"| {name} | {word}{' (official)' if word == name else ''} | {share[word]:.2f} | "
                         f"{own.mean():.3f} | {back.mean():.3f} | {other.mean():.3f} | "
                         f"{(own.mean() - back.mean()):.3f} | {100 * accuracy:.0f}% |")
    sets = {"official names (CLIMS)": None,
            "frequent words": [[world.frequent_word(c) for c in ls] for ls in labels],
            "rarest candidate": [[min(world.words[names[c]], key=lambda p: p[1])[0] for c in ls] for ls in labels]}
    losses = ["| words | loss, ground-truth masks | loss, all-ones masks | all-ones - ground truth |",
              "|---|---:|---:|---:|"]
    for label, pair_words in sets.items():
        values = []
        for given in (truth, torch.ones_like(truth)):
            with torch.no_grad():
                values.append(float(objective(model, given, pixels, labels, pair_words).loss))
        losses.append(f"| {label} | {values[0]:.2f} | {values[1]:.2f} | {values[1] - values[0]:.2f} |")
    drift = ["| words | step | loss | IoU with the ground truth (maps > 0.5) | mean map |", "|---|---:|---:|---:|---:|"]
    for label in ("official names (CLIMS)", "frequent words"):
        for step, loss, iou, mean in free_masks(objective, model, pixels, truth, labels, sets[label], args.steps):
            drift.append(f"| {label} | {step} | {loss:.2f} | {iou:.3f} | {mean:.3f} |")
    body = (f"`python benchmarks/word_scores_synthetic.py --num_images {args.num_images} --seed {args.seed} --steps "
            f"{args.steps}` on "
            f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
            f"{time.time() - start:.0f} s. Bundled tiny CLIP at its {size} px, {pairs} (image, class) pairs of "
            f"split `train`, ground-truth masks, CLIP's pooled image feature (CLIMS's), masking on the normalised "
            f"image (CLIMS's).\n\n" + "\n".join(lines) + "\n\nCLIMS's loss (10 OTM + 25 BTM + 1 CBS, mean over "
            "pairs, CBS against the world's four background words) of the same pairs:\n\n" + "\n".join(losses)
            + f"\n\nFree masks (no network): per pair an {GRID}x{GRID} logit map (the CAM network's grid at 128 px), "
            f"started at the ground truth (area-pooled), Adam lr {FREE_LR}, {args.steps} steps on the same loss, "
            "first 64 images:\n\n" + "\n".join(drift))
    print(body)
    if not args.no_write:
        replace_section(README, HEADING, body)


if __name__ == "__main__":
    main()
