"""Fine-tune CAT-Seg on Ray Train.

    python -m jobs.finetune --data s3://bucket/coco-stuff --layout cocostuff --model vit_b16 \\
        --clip-pretrained openai --storage s3://bucket/runs --run-name cocostuff-b16 \\
        --num-workers 4 --use-gpu --max-steps 80000

Runs on the cluster named by RAY_ADDRESS (as under `ray job submit`) or on an embedded local Ray. Re-running with
the same --storage and --run-name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from pipelines import cluster
from pipelines.training import LAYOUTS, FinetuneConfig, check_inputs, checkpoint_uri, resume_point, run_finetuning

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}


def _option(group: argparse._ArgumentGroup, flag: str, help: str = "", **kwargs: Any) -> None:
    """An option whose default is FinetuneConfig's (written once, there), shown in --help."""
    name = flag.removeprefix("--").replace("-", "_")
    if "action" not in kwargs and "required" not in kwargs:
        default = kwargs.setdefault("default", _DEFAULTS[name])
        if default is not None:
            kwargs.setdefault("type", type(default))
            help = f"{help} (default: {default})".strip()
    group.add_argument(flag, help=help, **kwargs)


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    _option(
        data, "--data", "dataset root (cocostuff, ade20k), manifest file (manifest), Label Studio JSON export "
        "(label-studio), COCO JSON (coco) or a jobs.label output (labels)", required=True,
    )  # fmt: skip
    _option(data, "--layout", f"dataset layout: one of {', '.join(LAYOUTS)}", required=True)
    _option(
        data, "--classes", "class-names file, one name per line (line i = label id i-1): the run's vocabulary "
        "(manifest: required; other layouts: sources are mapped onto it by name)",
    )  # fmt: skip
    _option(data, "--weight", "the --data source's weight against --add-source ones (2: each pair twice)")
    _option(
        data, "--add-source", "another source, LAYOUT=URI[,weight=W]; repeatable (e.g. labels=s3://b/run1,weight=0.3)",
        action="append", metavar="LAYOUT=URI",
    )  # fmt: skip
    _option(data, "--where", "labels sources: SQL condition on the run's table `labels` (e.g. 'mean_margin > 0.3')")
    _option(data, "--min-confidence", "labels sources: ignore pixels below this probability", type=float)
    _option(data, "--label-studio-url", "label-studio: the server images under /data/upload/ come from "
            "(API key in LABEL_STUDIO_API_KEY)")  # fmt: skip
    _option(data, "--local-files-root", "label-studio: Label Studio's LOCAL_FILES_DOCUMENT_ROOT (/data/local-files/)")
    _option(data, "--crop-size", "training crop side")
    _option(data, "--max-val-images", "validation images scored per evaluation")
    _option(data, "--val-fraction", "held out when there is no val split")

    model = parser.add_argument_group("model")
    _option(model, "--model", "architecture: vit_b16, vit_l14 or tiny (default: from --init-checkpoint)", default=None)
    _option(model, "--clip-pretrained", "open_clip tag or CLIP weights URI for a fresh model")
    _option(
        model,
        "--init-checkpoint",
        "start from these weights: a released name (vit_b16, vit_l14), a checkpoint, an official .pth or a run",
    )

    run = parser.add_argument_group("run")
    _option(run, "--storage", "where checkpoints go: s3://bucket/prefix or a local folder", required=True)
    _option(run, "--run-name", "the run's folder under --storage; same name = resume", required=True)
    _option(run, "--num-workers")
    _option(run, "--use-gpu", "one GPU per worker, NCCL (else CPU, gloo)", action="store_true")
    _option(
        run,
        "--cpus-per-worker",
        "default 1; on an embedded Ray, less if the workers would leave the data pipeline no CPU",
        type=float,
    )
    _option(run, "--bf16", "bfloat16 autocast (GPU only)", action="store_true")
    _option(run, "--max-failures", "worker-group restarts from the last checkpoint")
    _option(run, "--keep-checkpoints")

    solver = parser.add_argument_group("solver (defaults: the paper's)")
    _option(solver, "--max-steps", type=int, required=True)
    _option(solver, "--batch-size-per-worker")
    _option(solver, "--lr", "head learning rate (CLIP gets x0.01)")
    _option(solver, "--eval-every", "validation mIoU period in steps (0 = never)")
    _option(solver, "--checkpoint-every", "checkpoint period (and the last step)")
    _option(solver, "--log-every")
    _option(solver, "--seed")
    return FinetuneConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:  # every input check runs before Ray starts: a bad flag costs seconds, not a cluster
        datasets = check_inputs(config)
    except (ValueError, FileNotFoundError, PermissionError, TypeError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train, val = datasets
    print(
        f"fine-tuning: {len(train)} training pairs, {len(val) if val else 0} validation images, "
        f"{len(train.class_names)} classes ({train.layout}); run {config.storage.rstrip('/')}/{config.run_name}",
        flush=True,
    )
    resume = resume_point(config.storage, config.run_name)
    if resume is not None:
        print(f"resuming from step {resume[0]}: {resume[1]}", flush=True)

    import ray
    import ray.data
    import ray.train

    # Ray Data's progress bars (from the split coordinator) would flood the job log; the loop logs progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster.connect()  # RAY_ADDRESS (ray job submit, a user's cluster), else an embedded local Ray
    try:
        result = run_finetuning(config, datasets)
    except cluster.UnschedulableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # Ray's is multi-line
        if isinstance(err, ray.train.ControllerError):  # the worker group could not start, again and again
            reason += (
                f" (workers that cannot start for about CATSEG_RESOURCE_WAIT_SECONDS = "
                f"{cluster.RESOURCE_WAIT_SECONDS:g} s stop the run)"
            )
        # one write, so that Ray's log lines, printed by another thread to the same stream, cannot split it
        sys.stderr.write(
            f"\nerror: training failed: {reason}. The checkpoints Ray Train recorded are kept: re-running the same "
            "command resumes from the last one\n"
        )
        return 1
    finally:
        cluster.shutdown()
    metrics = result.metrics or {}
    summary = "".join(f", {k} {metrics[k]:.4g}" for k in ("loss", "val_miou") if k in metrics)
    print(f"done: step {metrics.get('step')} (resumed from step {metrics.get('resumed_from_step', 0)}){summary}")
    if result.checkpoint is not None:
        final = checkpoint_uri(config, result.checkpoint)
        print(f"final checkpoint: {final}/model  (catseg.load_model('{final}/model'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
