"""The labelling loop end to end, on a task where it can fail: a run's pseudo-labels get one class systematically
wrong on the images it is unsure of; a reviewer corrects some of those in Label Studio; evaluating the run against
the corrections shows the class's IoU low; fine-tuning on the corrections plus the run's confident labels and
relabelling raises it on corrections held out of training, by a margin stated here."""

from __future__ import annotations

import time

import numpy as np
from feedback_samples import reviewed_export, write_run
from synthetic_data import HALVES_CLASS_NAMES, make_halves_scene

from pipelines import storage
from pipelines.evaluation import evaluate_labels, read_reviewed
from pipelines.labelling import LabelConfig, run_labelling
from pipelines.models import resolve_model
from pipelines.training import FinetuneConfig, check_inputs, list_checkpoints, run_finetuning
from pipelines.vocabulary import load_vocabulary

RED, BLUE = 0, 1  # HALVES_CLASS_NAMES: "red paint", "blue sky"
CONFIDENT, DOUBTFUL, CORRECTED_FOR_TRAINING = 16, 16, 10
# The same task, budget and learning rate as tests/test_training.py (which measured them): 90 steps at lr 5e-3
# take a random tiny model from the constant solution to validation mIoU >= 0.7 on these scenes.
MAX_STEPS, TEST_LR = 90, 5e-3
RED_IOU_AFTER = 0.5  # held-out red IoU of the relabelled images must reach this (before: 0, every red pixel wrong)


def test_corrections_raise_the_iou_of_the_class_the_pseudo_labels_got_wrong(ray_cluster, tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(5)
    scenes = {f"scene{i:02d}.png": make_halves_scene(rng) for i in range(CONFIDENT + DOUBTFUL)}
    names = list(scenes)
    confident, doubtful = names[:CONFIDENT], names[CONFIDENT:]
    # the run: right where it is sure; on the doubtful images every red pixel called blue sky
    pseudo = {
        n: (image, label if n in confident else np.full_like(label, BLUE)) for n, (image, label) in scenes.items()
    }
    margins = {n: 0.6 if n in confident else 0.05 for n in names}
    timings = {}
    started = time.perf_counter()
    run = write_run(tmp_path, pseudo, HALVES_CLASS_NAMES, margins=margins)
    uri = {n: str(tmp_path / "images" / n) for n in names}
    # the reviewer corrected the doubtful images (the review queue's first); some train, the rest are held out
    train_reviews = {uri[n]: scenes[n][1] for n in doubtful[:CORRECTED_FOR_TRAINING]}
    held_reviews = {uri[n]: scenes[n][1] for n in doubtful[CORRECTED_FOR_TRAINING:]}
    train_export = reviewed_export(tmp_path / "review-train" / "export.json", train_reviews, HALVES_CLASS_NAMES)
    held_export = reviewed_export(tmp_path / "review-held" / "export.json", held_reviews, HALVES_CLASS_NAMES)
    held_out = read_reviewed("label-studio", held_export)

    before = evaluate_labels(run, held_out)
    timings["evaluate the run"] = time.perf_counter() - started
    assert before.images_evaluated == len(held_reviews)
    assert before.metrics.iou[RED] < 0.05, before.metrics.iou  # the run never says red on these images

    started = time.perf_counter()
    config = FinetuneConfig(
        data=train_export, layout="label-studio", weight=2.0,
        add_source=[f"labels={run}"], where="mean_margin > 0.3",
        storage=str(tmp_path / "runs"), run_name="corrected", model="tiny", init_checkpoint=tiny_checkpoint,
        num_workers=2, cpus_per_worker=0.5, max_steps=MAX_STEPS, batch_size_per_worker=2, crop_size=96, lr=TEST_LR,
        eval_every=0, checkpoint_every=MAX_STEPS, log_every=10,
    )  # fmt: skip
    train, _ = check_inputs(config)
    assert len(train) == 2 * CORRECTED_FOR_TRAINING + CONFIDENT  # the corrections twice, the confident rows once
    run_finetuning(config, (train, None))
    timings["fine-tune"] = time.perf_counter() - started

    started = time.perf_counter()
    manifest = storage.join(str(tmp_path), "held-out.csv")
    storage.write_text(manifest, "uri\n" + "".join(f"{u}\n" for u in held_reviews))
    checkpoint = list_checkpoints(config.storage, config.run_name)[-1][1]
    relabelled = run_labelling(
        LabelConfig(
            output_uri=str(tmp_path / "relabelled"), vocabulary=load_vocabulary(HALVES_CLASS_NAMES),
            model=resolve_model(checkpoint=checkpoint), manifest_uri=manifest, batch_size=2, cpus_per_actor=0.5,
        )
    )  # fmt: skip
    timings["relabel"] = time.perf_counter() - started
    assert relabelled.ok == len(held_reviews)

    after = evaluate_labels(str(tmp_path / "relabelled"), held_out)
    print(
        f"held-out red IoU {before.metrics.iou[RED]:.3f} -> {after.metrics.iou[RED]:.3f}, mIoU "
        f"{before.metrics.miou:.3f} -> {after.metrics.miou:.3f}; "
        + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items())
    )
    assert after.images_evaluated == len(held_reviews)
    assert after.metrics.iou[RED] >= RED_IOU_AFTER, (before.metrics.iou, after.metrics.iou)
