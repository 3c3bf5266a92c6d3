"""Command-line options shared by the jobs that run the model on an actor pool (jobs.label, jobs.evaluate)."""

from __future__ import annotations

import argparse

from catseg import PRECISIONS


def add_model_actor_options(parser: argparse.ArgumentParser, *, batch_size: int, precision_help: str) -> None:
    """--batch-size, --num-gpus-per-actor, --max-actors, --cpus-per-actor and --precision."""
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"images per model call (default: {batch_size})"
    )
    parser.add_argument("--num-gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs, else 0")
    parser.add_argument("--max-actors", type=int, help="model actors at most (default: one per GPU, or 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per model actor (default: 1)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float32", help=f"{precision_help} (default: float32)"
    )
