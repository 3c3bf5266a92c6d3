"""Command-line options shared by the jobs that run the model on an actor pool (jobs.label, jobs.evaluate); the
defaults come from each job's config dataclass."""

from __future__ import annotations

import argparse
from typing import Any

from catseg import PRECISIONS


def add_model_options(parser: argparse.ArgumentParser, labels_help: str | None = None) -> None:
    """--model NAME or --checkpoint URI, resolved by pipelines.models.resolve_model (or --labels RUN with
    ``labels_help``: a labelling run's stored masks instead of a model)."""
    model = parser.add_mutually_exclusive_group(required=True)
    if labels_help:
        model.add_argument("--labels", metavar="RUN_URI", help=labels_help)
    model.add_argument("--model", help="released weights by name: vit_b16, vit_l14 (fetched once, then cached)")
    model.add_argument(
        "--checkpoint",
        help="catseg.save_model directory, official .pth, or a fine-tuning run / step directory (any fsspec URI)",
    )


def add_model_actor_options(parser: argparse.ArgumentParser, defaults: Any, precision_help: str) -> None:
    """--batch-size, --num-gpus-per-actor, --max-actors, --cpus-per-actor and --precision; ``defaults`` is the job's
    config dataclass (LabelConfig, EvaluationConfig), whose field defaults the options show and use."""
    batch_size, cpus_per_actor = defaults.batch_size, defaults.cpus_per_actor
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"images per model call (default: {batch_size})"
    )
    parser.add_argument("--num-gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs, else 0")
    parser.add_argument("--max-actors", type=int, help="model actors at most (default: one per GPU, or 1)")
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=cpus_per_actor,
        help=f"CPUs per model actor (default: {cpus_per_actor:g})",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float32", help=f"{precision_help} (default: float32)"
    )
