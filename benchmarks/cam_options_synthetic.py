"""CLIP-ES-exact CAMs vs the corrected options on the synthetic world (bundled tiny CLIP and learned prompts).

    python benchmarks/cam_options_synthetic.py --num_images 200

Scores, per setting, the CAA-refined CAM mIoU and the CRF pseudo-mask mIoU (background power searched over {1, 2})
with `pole_hf.evaluation.evaluate_cams`; writes the table into benchmarks/README.md under
"## CAM options on the synthetic world".
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_synthetic import README, replace_section  # noqa: E402
from synthetic_args import parse_benchmark_args  # noqa: E402

HEADING = "## CAM options on the synthetic world"
SETTINGS = {
    "CLIP-ES exact (defaults)": {},
    "box_edges='full'": {"box_edges": "full"},
    "crf_image='rgb'": {"crf_image": "rgb"},
    "both corrected": {"box_edges": "full", "crf_image": "rgb"},
    "position_embedding='bicubic'": {"position_embedding": "bicubic"},
}


def main(argv=None):
    args = parse_benchmark_args(__doc__.splitlines()[0], 200, argv)
    from pole_hf import PolePromptModel
    from pole_hf.bundled import TINY_PROMPTS
    from pole_hf.data import load_synthetic
    from pole_hf.evaluation import evaluate_cams

    model = PolePromptModel.from_pretrained(TINY_PROMPTS).eval()
    dataset = load_synthetic(num_images=args.num_images, seed=args.seed,
                             image_size=model.clip.config.vision_config.image_size, split="test")
    start = time.time()
    rows = []
    for name, options in SETTINGS.items():
        result = evaluate_cams(model, dataset, refine=True, crf=True, progress=False, **options)
        rows.append((name, 100 * result["miou"], 100 * result["pseudo_mask"]["miou"]))
        print(rows[-1], flush=True)
    table = "| setting | CAM mIoU (CAA) | pseudo-mask mIoU (CAA + CRF) |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {cam:.2f} | {crf:.2f} |" for name, cam, crf in rows)
    body = (f"`python benchmarks/cam_options_synthetic.py --num_images {args.num_images} --seed {args.seed}` on "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
            f"{time.strftime('%Y-%m-%d')}, {time.time() - start:.0f} s. Bundled tiny CLIP with its learned prompts; "
            f"held-out split `test`, seed {args.seed}; ground-truth labels as targets; mIoU (%) of the best "
            f"background power in {{1, 2}}; pseudo masks scored without the 0.95 cut (as CLIP-ES's --eval_only)."
            f"\n\n{table}")
    print(body)
    if not args.no_write:
        replace_section(README, HEADING, body)


if __name__ == "__main__":
    main()
