"""Our Ray calls use current APIs: a labelling run draws no deprecation or "experimental" warning from Ray, and the
model actors still reserve what they ask for."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
from labelling_samples import noise_array
from PIL import Image

from pipelines.labelling.run import RETRIED_WRITE_ERRORS, LabelConfig, run_labelling
from pipelines.models import resolve_model
from pipelines.vocabulary import load_vocabulary
from pipelines.workers import ModelActors

NOTICE = re.compile(r"deprecat|experimental", re.IGNORECASE)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def ray_data_log():
    """Ray Data's driver-side log records (its "ray.data" logger does not propagate to pytest's caplog)."""
    handler = _Records()
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def test_a_labelling_run_on_a_gpu_actor_draws_no_deprecation_or_experimental_warning(
    ray_cluster, tiny_checkpoint, tmp_path, ray_data_log
):
    import ray

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(noise_array(32, 40, 3, i)).save(images / f"{i}.jpg")
    config = LabelConfig(
        output_uri=str(tmp_path / "labels"),
        vocabulary=load_vocabulary("cat,sky"),
        model=resolve_model(checkpoint=tiny_checkpoint),
        input_uri=str(images),
        batch_size=2,
        num_gpus_per_actor=1,  # the session cluster's fake GPU: the num_cpus + num_gpus case
        cpus_per_actor=1,
    )
    # Ray's own DataContext() warns about its deprecated fields while it builds itself: not a call of ours
    ray.data.DataContext.get_current()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_labelling(config)
    assert summary.ok == 3
    notices = [
        f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in caught if NOTICE.search(str(w.message))
    ]
    notices += [f"log {r.name}: {r.getMessage()}" for r in ray_data_log if NOTICE.search(r.getMessage())]
    assert not notices, "\n".join(notices)


def test_retried_write_errors_mean_the_same_as_substrings_and_as_regexes():
    # Ray Data matches retried_io_errors as substrings today and as regexes from December 2026
    for pattern in RETRIED_WRITE_ERRORS:
        assert re.escape(pattern).replace("\\ ", " ") == pattern, pattern


def _resources_probe() -> type:
    # defined in a function so cloudpickle ships it by value (workers cannot import this test module)
    class _Resources:
        def __call__(self, batch: dict) -> dict:
            import ray

            assigned = ray.get_runtime_context().get_assigned_resources()
            batch["cpus"] = [assigned.get("CPU", 0.0)] * len(batch["id"])
            batch["gpus"] = [assigned.get("GPU", 0.0)] * len(batch["id"])
            return batch

    return _Resources


@pytest.mark.parametrize("cpus", [1.0, 0.5])
def test_a_gpu_model_actor_reserves_the_cpus_it_asks_for(ray_cluster, cpus):
    import ray

    actors = ModelActors(num_gpus_per_actor=1.0, max_actors=1, cpus_per_actor=cpus)
    rows = ray.data.range(2).map_batches(_resources_probe(), batch_size=2, **actors.map_batches_args()).take_all()
    assert {(row["cpus"], row["gpus"]) for row in rows} == {(cpus, 1.0)}
