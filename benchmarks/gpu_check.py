#!/usr/bin/env python
"""The CAM engine and a POLE training step on CUDA at ViT-B/16 size: agreement with CPU and timings.

A random-init CLIP of OpenAI ViT-B/16's shape (as ``bench_cam.py``; nothing is downloaded) wrapped in a 20-class VOC
``PolePromptModel``. Checks, on the same weights and inputs:

* CAMs on CUDA against CAMs on CPU (fp32) and against the per-class reference GradCAM loop on CUDA;
* CAMs with the model cast to bfloat16 against fp32 (mean and max absolute difference of the [0, 1] maps);
* one POLE step (OTM + BTM + CBS plus the raw foreground-minus-background score margin, since random weights leave
  every cosine below POLE's clamp range; Adam on the class tokens) on CUDA against CPU: the updated class tokens;
* CUDA timings (median of ``--repeats`` after warm-up, synchronised): plain vision forward, engine CAMs for 1/3/5
  classes, the reference loop for 3, CAA refinement, at 224 and 448 px; one training step at batch 16.

Usage::

    python benchmarks/gpu_check.py --out gpu_check.json   # prints a markdown report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cam import CLASS_ORDER, build_model, grid, reference_grid_cams


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def training_step(model, objective, pixels, labels, lr: float = 1e-3) -> torch.Tensor:
    """One POLE step from the model's current class tokens; returns the updated tokens (the model is restored)."""
    tokens = model.prompt_learner.class_tokens
    start = tokens.detach().clone()
    optimizer = torch.optim.Adam([tokens], lr=lr)
    from pole_hf.objective import pairs_from_cams

    cams = model.get_cams(pixels, labels)  # the batch's CAMs: one forward, one batched backward
    maps, images, classes = pairs_from_cams(cams.cams, cams.cam_classes)
    out = objective(model, pixels, maps, classes, image_indices=images)
    # random weights put the cosines below POLE's clamp range (no gradient): the raw score margin is added so that
    # the step moves the tokens through the same path (CAMs, masked images, features, scores)
    loss = out.loss + (out.fg_scores - out.bg_scores).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    updated = tokens.detach().clone()
    with torch.no_grad():
        tokens.copy_(start)
    return updated


def main(argv=None) -> int:
    from pole_hf.objective import PoleObjective

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16, help="images per training step")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 agreement is checked: no TF32 shortcuts
    torch.backends.cudnn.allow_tf32 = False

    model = build_model(quick=False, seed=0)
    generator = torch.Generator().manual_seed(0)
    images = {side: torch.randn(1, 3, side, side, generator=generator) for side in (224, 448)}
    classes3 = list(CLASS_ORDER[:3])
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                     "torch": torch.__version__, "python": platform.python_version()}

    cpu_cams = grid(model, images[224], classes3)
    batch = torch.randn(args.batch_size, 3, 224, 224, generator=generator)
    labels = [[int(c) for c in torch.randperm(20, generator=generator)[: 1 + i % 3]] for i in range(args.batch_size)]
    objective = PoleObjective(image_feature="pooled")
    cpu_tokens = training_step(model, objective, batch[:4], labels[:4])

    model.to(device)
    gpu = {side: x.to(device) for side, x in images.items()}
    gpu_cams = grid(model, gpu[224], classes3)
    reference = reference_grid_cams(model, gpu[224], classes3)
    results["cams_cuda_vs_cpu_max_abs"] = float((gpu_cams.cpu() - cpu_cams).abs().max())
    results["cams_engine_vs_reference_cuda_max_abs"] = float((gpu_cams - reference).abs().max())
    gpu_tokens = training_step(model, objective, batch[:4].to(device), labels[:4])
    results["pole_step_tokens_cuda_vs_cpu_max_abs"] = float((gpu_tokens.cpu() - cpu_tokens).abs().max())
    results["pole_step_token_change_max_abs"] = float((cpu_tokens - model.prompt_learner.class_tokens.detach().cpu())
                                                      .abs().max())

    timings = {}
    for side, pixels in gpu.items():
        with torch.no_grad():
            timings[f"forward_{side}"] = timed(lambda p=pixels: model.get_image_features(p), device, 3, args.repeats)
        for k in (1, 3, 5):
            chosen = list(CLASS_ORDER[:k])
            timings[f"engine{k}_{side}"] = timed(lambda p=pixels, c=chosen: grid(model, p, c), device, 3,
                                                 args.repeats)
        timings[f"reference3_{side}"] = timed(lambda p=pixels: reference_grid_cams(model, p, classes3), device, 3,
                                              args.repeats)
        timings[f"caa3_{side}"] = timed(lambda p=pixels: grid(model, p, classes3, refine=True), device, 3,
                                        args.repeats)
    batch_gpu = batch.to(device)
    timings[f"pole_step_batch{args.batch_size}_224"] = timed(
        lambda: training_step(model, objective, batch_gpu, labels), device, 2, max(3, args.repeats // 4))
    # images/s of the CAMs: one image per call vs the whole batch in one call (2 labels each)
    pairs = [list(CLASS_ORDER[:2])] * len(batch_gpu)
    one = timed(lambda: [model.get_cams(batch_gpu[i:i + 1], pairs[:1]) for i in range(len(batch_gpu))], device, 1,
                max(3, args.repeats // 4))
    many = timed(lambda: model.get_cams(batch_gpu, pairs), device, 1, max(3, args.repeats // 4))
    timings[f"cams_batch1_x{len(batch_gpu)}_224"], timings[f"cams_batch{len(batch_gpu)}_224"] = one, many
    results["cams_images_per_s_batch1_vs_batched"] = [1000 * len(batch_gpu) / one, 1000 * len(batch_gpu) / many]
    results["timings_ms"] = timings
    if device.type == "cuda":
        results["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20

    try:  # bfloat16 weights: how far the maps move
        model.to(torch.bfloat16)
        half_cams = grid(model, gpu[224], classes3).float()
        diff = (half_cams - gpu_cams.float()).abs()
        results["cams_bf16_vs_fp32"] = {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}
        timings["engine3_224_bf16"] = timed(lambda: grid(model, gpu[224], classes3), device, 3,
                                            args.repeats)
    except Exception as err:  # reported, not hidden: bf16 is optional
        results["cams_bf16_vs_fp32"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0]}"

    lines = [f"Device: {results['device']}, torch {results['torch']}.", "",
             "| check | value |", "|---|---|"]
    for key, value in results.items():
        if key not in ("timings_ms", "device", "torch", "python"):
            lines.append(f"| {key} | {json.dumps(value) if isinstance(value, dict) else value} |")
    lines += ["", "| timing (ms, median) | value |", "|---|---|"]
    lines += [f"| {key} | {value:.2f} |" for key, value in timings.items()]
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
