"""Fine-tune CAT-Seg on Ray Train.

    python -m jobs.finetune --data s3://bucket/coco-stuff --layout cocostuff --model vit_b16 \\
        --clip-pretrained openai --storage s3://bucket/runs --run-name cocostuff-b16 \\
        --num-workers 4 --use-gpu --max-steps 80000

Runs on the cluster named by RAY_ADDRESS (as under `ray job submit`) or on an embedded local Ray. Re-running with
the same --storage and --run-name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from catseg.finetune import BASE_LR
from pipelines import cluster
from pipelines.datasets import LAYOUTS
from pipelines.training import FinetuneConfig, check_inputs, checkpoint_uri, resume_point, run_finetuning


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset root (cocostuff, ade20k) or manifest file (manifest)")
    data.add_argument("--layout", required=True, help=f"dataset layout: one of {', '.join(LAYOUTS)}")
    data.add_argument("--classes", help="class-names file, one name per line (line i = label id i-1); manifest")
    data.add_argument("--crop-size", type=int, default=384, help="training crop side (reference 384)")
    data.add_argument("--max-val-images", type=int, default=100, help="validation images scored per evaluation")
    data.add_argument("--val-fraction", type=float, default=0.05, help="held out when there is no val split")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="architecture: vit_b16, vit_l14 or tiny (default: from --init-checkpoint)")
    model.add_argument("--clip-pretrained", help="open_clip tag or CLIP weights URI for a fresh model")
    model.add_argument(
        "--init-checkpoint",
        help="start from these weights: a released name (vit_b16, vit_l14), a checkpoint, an official .pth or a run",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--storage", required=True, help="where checkpoints go: s3://bucket/prefix or a local folder")
    run.add_argument("--run-name", required=True, help="the run's folder under --storage; same name = resume")
    run.add_argument("--num-workers", type=int, default=1)
    run.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL (else CPU, gloo)")
    run.add_argument(
        "--cpus-per-worker",
        type=float,
        help="default 1; on an embedded Ray, less if the workers would leave the data pipeline no CPU",
    )
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU only)")
    run.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    run.add_argument("--keep-checkpoints", type=int, default=3)

    solver = parser.add_argument_group("solver (defaults: the paper's)")
    solver.add_argument("--max-steps", type=int, required=True)
    solver.add_argument("--batch-size-per-worker", type=int, default=4)
    solver.add_argument(
        "--lr", type=float, default=BASE_LR, help=f"head learning rate (default {BASE_LR}; CLIP gets x0.01)"
    )
    solver.add_argument("--eval-every", type=int, default=5000, help="validation mIoU period in steps (0 = never)")
    solver.add_argument("--checkpoint-every", type=int, default=1000, help="checkpoint period (and the last step)")
    solver.add_argument("--log-every", type=int, default=20)
    solver.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return FinetuneConfig(
        data=args.data,
        layout=args.layout,
        storage=args.storage,
        run_name=args.run_name,
        model=args.model,
        classes=args.classes,
        clip_pretrained=args.clip_pretrained,
        init_checkpoint=args.init_checkpoint,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_steps=args.max_steps,
        batch_size_per_worker=args.batch_size_per_worker,
        crop_size=args.crop_size,
        lr=args.lr,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        max_val_images=args.max_val_images,
        val_fraction=args.val_fraction,
        max_failures=args.max_failures,
        keep_checkpoints=args.keep_checkpoints,
        bf16=args.bf16,
        seed=args.seed,
    )


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
        f"{len(train.class_names)} classes ({config.layout}); run {config.storage.rstrip('/')}/{config.run_name}",
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
        print(f"error: training failed: {err}", file=sys.stderr)
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
