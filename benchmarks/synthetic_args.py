"""The command line shared by the synthetic-world quality benchmarks: image count, seed, threads, print-only."""

import argparse

import torch


def parse_benchmark_args(description: str, num_images: int, argv=None, extra=None) -> argparse.Namespace:
    """`--num_images`, `--seed`, `--threads` (torch's thread count is set) and `--no_write` (leave README.md);
    `extra(parser)` adds a script's own flags."""
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--num_images", type=int, default=num_images)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_write", action="store_true", help="print only, leave README.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args
