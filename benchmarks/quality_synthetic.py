"""CAM quality on the synthetic world: official class names vs POLE's selected words vs learned class tokens.

    python benchmarks/quality_synthetic.py --num_images 300

The same comparison as `pole-hf demo`, on a larger held-out split with fixed seeds, plus the paper's first finding
in the CLIP-ES route: prompts learned from the official names with the context alone (CoOp) or the class tokens
alone (DeFo-like), by `examples/train_pole.py --learn context|class_tokens` with the shipped prompts' recipe (no
selection). Writes the table into benchmarks/README.md under "## Quality on the synthetic world".
"""

from __future__ import annotations

import os
import platform
import re
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_args import parse_benchmark_args  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
HEADING = "## Quality on the synthetic world"


def replace_section(path: str, heading: str, body: str) -> None:
    """Replace (or append) the `heading` section of a markdown file, up to the next `## ` heading."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


LEARN_RECIPE = ["--dataset", "synthetic", "--num_images", "400", "--loss_image_feature", "pooled", "--learning_rate",
                "1e-3", "--max_train_steps", "100", "--train_batch_size", "16", "--seed", "0", "--cpu"]
"""`examples/README.md`'s recipe of the shipped prompts, without `--select` (learning from the official names)."""


def learned_variants(work: str) -> dict:
    """`{"learned context": model, "learned class tokens": model}` trained by train_pole from the official names."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    try:
        import train_pole
    finally:
        sys.path.pop(0)
    from pole_hf import PolePromptModel

    models = {}
    for name, learn in (("learned context", "context"), ("learned class tokens", "class_tokens")):
        out = os.path.join(work, learn)
        train_pole.main([*LEARN_RECIPE, "--learn", learn, "--output_dir", out])
        models[name] = PolePromptModel.from_pretrained(out)
    return models


def main(argv=None):
    args = parse_benchmark_args(__doc__.splitlines()[0], 300, argv)
    from pole_hf.demo import run_demo

    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        extra = learned_variants(os.path.join(out, "learned"))
        results = run_demo(out, num_images=args.num_images, seed=args.seed, progress=False, extra_models=extra)
        table = open(os.path.join(out, "results.json"), encoding="utf-8").read()
    import json

    table = json.loads(table)["table"]
    seconds = time.time() - start
    official = results["official names"]["cam_miou"]
    gains = {v: r["cam_miou"] - official for v, r in results.items() if v != "official names"}
    words = results.get("selected words", {}).get("words", {})
    body = (f"`python benchmarks/quality_synthetic.py --num_images {args.num_images} --seed {args.seed}` on "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
            f"{time.strftime('%Y-%m-%d')}, {seconds:.0f} s. Bundled tiny CLIP; held-out split `test`, seed "
            f"{args.seed}; CAM IoU per class (%), background power searched over {{1, 2}}; pseudo masks = dense CRF on "
            f"the CAM scores (CLIP-ES's settings).\n\n{table}\n\nGain over the official names (CAM mIoU points): "
            + ", ".join(f"{v} {g:+.1f}" for v, g in gains.items())
            + f".\n\nSelected words: {json.dumps(words)}. Learned context / learned class tokens: "
            f"`examples/train_pole.py {' '.join(LEARN_RECIPE)} --learn context` (or `class_tokens`) from the official "
            "names, the shipped prompts' recipe without `--select`.")
    print(body)
    if not args.no_write:
        replace_section(README, HEADING, body)


if __name__ == "__main__":
    main()
