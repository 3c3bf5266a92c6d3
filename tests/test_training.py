"""Fine-tuning on a real local Ray cluster (2 CPU workers, gloo) with data and checkpoints in moto S3.

One run carries most assertions, because every Ray Train start costs tens of seconds on this 2-core machine:
the tiny model learns a synthetic colour-shape task (loss down, validation mIoU up past a stated threshold) while
a training worker is SIGKILLed after the first checkpoint and FailureConfig restores the group from it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from synthetic_data import HALVES_CLASS_NAMES, write_cocostuff, write_manifest

import catseg
from pipelines import storage
from pipelines.training.checkpoints import PROGRESS_FILE, list_checkpoints, resume_point
from pipelines.training.config import FinetuneConfig
from pipelines.training.run import check_inputs, cosine_schedule, run_finetuning
from pipelines.training.validation import evaluate_miou, load_eval_examples, miou_from_confusion

# Synthetic task and budget: two classes, each a solid half of the image. The test's lr (5e-3) is 25x the
# paper's 2e-4: the paper trains 80k steps from CLIP weights, this test a randomly initialized tiny model for 90.
# Measured in a single-process replica of this loop: at lr 1e-2, about 1 start in 10 never leaves the constant
# (loss ln 2) solution; at 2e-2, most; at 5e-3, none of 8, all ending at validation mIoU >= 0.87 after 60 steps.
# On Ray (2 workers, shuffled data, a restart) the escape comes later and varies: after 60 steps one run in
# about eight still scored 0.39 while others had loss at ln 2 until step 20 and still reached 0.89, hence 90.
MAX_STEPS = 90
CHECKPOINT_EVERY = 30
TEST_LR = 5e-3
MIOU_THRESHOLD = 0.7  # the untrained model scores about 0.3 on this set


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc: parent id is field 4 of /proc/PID/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def _kill_one_training_worker(storage_uri: str, run_name: str, killed: list[int], timeout: float = 300) -> None:
    """Wait for the run's first committed checkpoint, then SIGKILL one Ray Train worker process of this test's
    cluster (killing while a checkpoint is still being reported would restart from the one before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and resume_point(storage_uri, run_name) is None:
        time.sleep(0.5)
    for pid in _descendants(os.getpid()):  # only processes of the cluster this test process started
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
        except OSError:
            continue
        if "RayTrainWorker" in command:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return


def test_finetuning_learns_and_recovers_from_a_dead_worker(ray_cluster, s3_bucket, tiny_model, tiny_checkpoint):
    root = f"s3://{s3_bucket}/synthetic"
    manifest, classes = write_manifest(root, {"train": 24, "val": 6}, seed=1, task="halves")
    config = FinetuneConfig(
        data=manifest,
        layout="manifest",
        classes=classes,
        storage=f"s3://{s3_bucket}/runs",
        run_name="learn",
        model="tiny",
        init_checkpoint=tiny_checkpoint,
        num_workers=2,
        cpus_per_worker=0.5,
        max_steps=MAX_STEPS,
        batch_size_per_worker=2,
        crop_size=96,
        lr=TEST_LR,
        eval_every=MAX_STEPS,
        checkpoint_every=CHECKPOINT_EVERY,
        log_every=5,
        max_failures=1,
        keep_checkpoints=MAX_STEPS // CHECKPOINT_EVERY,
    )
    train, val = check_inputs(config)
    val_examples = load_eval_examples(val.pairs, "class_ids", HALVES_CLASS_NAMES, 96)
    cpu, no_autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    baseline = evaluate_miou(tiny_model, val_examples, HALVES_CLASS_NAMES, cpu, no_autocast)

    killed: list[int] = []
    killer = threading.Thread(target=_kill_one_training_worker, args=(config.storage, config.run_name, killed))
    killer.start()
    result = run_finetuning(config, (train, val))
    killer.join()

    # a worker died after the first checkpoint; the group restarted from a saved step and finished
    assert killed, "no Ray Train worker process was found to kill"
    assert result.metrics["step"] == MAX_STEPS
    assert result.metrics["resumed_from_step"] in range(CHECKPOINT_EVERY, MAX_STEPS, CHECKPOINT_EVERY)

    # the model learned: loss at the last checkpoint below the first, validation mIoU past the threshold
    progress = [
        json_loads(storage.read_text(f"{uri}/{PROGRESS_FILE}")) for _, uri in list_checkpoints(config.storage, "learn")
    ]
    assert [p["step"] for p in progress] == list(range(CHECKPOINT_EVERY, MAX_STEPS + 1, CHECKPOINT_EVERY))
    assert progress[-1]["loss"] < progress[0]["loss"]
    losses = {p["step"]: round(p["loss"], 3) for p in progress}
    assert result.metrics["val_miou"] > max(MIOU_THRESHOLD, baseline + 0.2), (
        f"validation mIoU {result.metrics['val_miou']:.3f} (untrained {baseline:.3f}); loss by step {losses}; "
        f"resumed from step {result.metrics['resumed_from_step']}"
    )

    # the final checkpoint loads with catseg.load_model; frozen CLIP weights are untouched, trainable ones moved
    final = catseg.load_model(f"{list_checkpoints(config.storage, 'learn')[-1][1]}/model")
    trainable = set(catseg.configure_finetuning(catseg.build_model("tiny")))
    before, after = tiny_model.state_dict(), final.state_dict()
    frozen = [name for name, _ in tiny_model.named_parameters() if name not in trainable]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    clip_trainable = [name for name in trainable if name.startswith("backbone.")]
    moved = [name for name in clip_trainable if not torch.equal(before[name], after[name])]
    # the last visual block runs in dense mode: its q projection gets no gradient, so it stays put
    assert set(clip_trainable) - set(moved) <= {name for name in clip_trainable if "visual" in name and ".q_" in name}
    assert all(not torch.equal(before[n], after[n]) for n in trainable if not n.startswith("backbone."))


def json_loads(text: str) -> dict:
    import json

    return json.loads(text)


def test_cosine_schedule_decays_to_zero():
    factor = cosine_schedule(100)
    assert factor(0) == 1.0 and factor(50) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)
    assert factor(150) == pytest.approx(0.0)


def test_validation_miou_is_the_evaluation_miou_on_the_same_confusion():
    from pipelines.metrics import compute_metrics

    # class 2 is predicted (2 pixels) but absent from the ground truth: detectron2 leaves it out of the mean
    confusion = torch.tensor([[8, 0, 2], [0, 10, 0], [0, 0, 0]])
    assert miou_from_confusion(confusion) == compute_metrics(confusion.numpy()).miou
    assert miou_from_confusion(confusion) == pytest.approx(np.mean([8 / 10, 10 / 10]))


def test_miou_counts_only_classes_that_occur():
    confusion = torch.tensor([[8, 2, 0], [0, 10, 0], [0, 0, 0]])
    expected = np.mean([8 / 10, 10 / 12])
    assert miou_from_confusion(confusion) == pytest.approx(expected)


# -- bad input is refused before Ray starts ------------------------------------------------------------------------


def _config(**overrides) -> FinetuneConfig:
    values = dict(
        data="s3://none/manifest.parquet", layout="manifest", classes="s3://none/classes.txt",
        storage="s3://none/runs", run_name="bad", model="tiny", max_steps=1,
    )  # fmt: skip
    values.update(overrides)
    return FinetuneConfig(**values)


def test_unknown_layout_and_model_are_refused():
    with pytest.raises(ValueError, match="unknown dataset layout 'pascal'"):
        check_inputs(_config(layout="pascal"))
    with pytest.raises(ValueError, match="unknown model 'vit_h14'"):
        check_inputs(_config(model="vit_h14"))
    with pytest.raises(ValueError, match="needs a class-names file"):
        check_inputs(_config(classes=None))


def test_unwritable_storage_is_refused(s3_bucket, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="cannot write under"):
        check_inputs(_config(storage=str(blocker / "runs")))


def test_missing_label_files_are_refused(s3_bucket):
    root = f"s3://{s3_bucket}/data"
    manifest, classes = write_manifest(root, {"train": 4, "val": 1})
    storage.filesystem(root)[0].rm(f"{s3_bucket}/data/files/train_3_label.png")
    config = _config(data=manifest, classes=classes, storage=f"s3://{s3_bucket}/runs")
    with pytest.raises(FileNotFoundError, match=r"train_3_label\.png"):
        check_inputs(config)


def test_class_names_that_do_not_match_labels_are_refused(s3_bucket):
    root = f"s3://{s3_bucket}/data"
    manifest, _ = write_manifest(root, {"train": 4, "val": 1})
    storage.write_text(f"{root}/two.txt", "red square\ngreen disc\n")
    config = _config(data=manifest, classes=f"{root}/two.txt", storage=f"s3://{s3_bucket}/runs")
    with pytest.raises(ValueError, match="does not match the labels"):
        check_inputs(config)


def test_too_few_pairs_for_one_global_batch_are_refused(s3_bucket):
    root = f"s3://{s3_bucket}/data"
    manifest, classes = write_manifest(root, {"train": 3, "val": 1})
    config = _config(
        data=manifest, classes=classes, storage=f"s3://{s3_bucket}/runs", num_workers=2, batch_size_per_worker=2
    )
    with pytest.raises(ValueError, match="3 training pairs cannot fill one global batch of 4"):
        check_inputs(config)


def test_layout_without_a_validation_split_holds_out_training_pairs(s3_bucket):
    root = f"s3://{s3_bucket}/coco-stuff"
    write_cocostuff(root, {"train2017": 6})
    config = _config(
        data=root, layout="cocostuff", classes=None, storage=f"s3://{s3_bucket}/runs", val_fraction=0.3,
        batch_size_per_worker=1,
    )  # fmt: skip
    train, val = check_inputs(config)
    assert len(val) >= 1 and len(train) + len(val) == 6 and not set(train.pairs) & set(val.pairs)
    assert train.class_names == val.class_names and len(train.class_names) == 171

    # a validation split that exists but is broken is an error, not a reason to hold out
    write_cocostuff(root, {"val2017": 2})
    storage.filesystem(root)[0].rm(f"{s3_bucket}/coco-stuff/annotations/val2017/000000000001.png")
    with pytest.raises(FileNotFoundError, match="have no label PNG"):
        check_inputs(config)
