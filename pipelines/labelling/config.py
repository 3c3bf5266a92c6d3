"""A labelling run's settings (:class:`LabelConfig`): what it reads, how it labels, what decides its rows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import catseg
from pipelines import storage
from pipelines.images import DEFAULT_MAX_PIXELS
from pipelines.labelling.plan import RETRY_POLICIES, TODO_ROWS_PER_FILE
from pipelines.masks import REVIEW_THRESHOLD, mask_dtype
from pipelines.masks import unlabelled_value as unlabelled_value_for
from pipelines.models import ModelSource

if TYPE_CHECKING:
    from pipelines.vocabulary import Vocabulary


@dataclass(frozen=True)
class LabelConfig:
    """One labelling run. ``input_uri`` (prefix, directory or glob) or ``manifest_uri`` names the images."""

    output_uri: str
    vocabulary: Vocabulary
    model: ModelSource
    input_uri: str | None = None
    manifest_uri: str | None = None
    uri_column: str = "uri"
    run_id: str | None = None
    batch_size: int = 4
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_actors: int | None = None  # None: one per GPU, or 1 without GPUs
    cpus_per_actor: float = 1.0
    confidence: bool = False
    confidence_threshold: float | None = None
    limit: int | None = None
    rows_per_file: int = 256
    precision: str = "float32"  # "bfloat16"/"float16": autocast in the model stage (GPUs with tensor cores)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images become error rows; None: Pillow's bomb limit only
    retry_errors: str = "transient"  # which committed error rows a re-run labels again: transient, all, none

    def __post_init__(self) -> None:
        if (self.input_uri is None) == (self.manifest_uri is None):
            raise ValueError("give exactly one of an input URI or a manifest URI")
        for name in ("output_uri", "input_uri", "manifest_uri"):  # DIR and DIR/ are one run
            if getattr(self, name) is not None:
                object.__setattr__(self, name, storage.normalize_uri(getattr(self, name)))
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if self.max_actors is not None and self.max_actors < 1:
            raise ValueError(f"--max-actors must be at least 1, got {self.max_actors}")
        if self.cpus_per_actor <= 0 or (self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0):
            raise ValueError("--cpus-per-actor must be > 0 and --num-gpus-per-actor >= 0")
        if self.batch_size < 1 or self.rows_per_file < 1:
            raise ValueError("batch_size and rows_per_file must be at least 1")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must be >= 0")
        if self.retry_errors not in RETRY_POLICIES:
            raise ValueError(f"--retry-errors must be one of {', '.join(RETRY_POLICIES)}, got {self.retry_errors!r}")
        if self.precision not in catseg.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(catseg.PRECISIONS)}, got {self.precision!r}")

    def fingerprint(self) -> dict[str, Any]:
        """What decides the content of the rows: a resumed run must match it (limit and resources may change)."""
        return {
            "input_uri": self.input_uri,
            "manifest_uri": self.manifest_uri,
            "uri_column": self.uri_column if self.manifest_uri else None,
            "vocab_id": self.vocabulary.vocab_id,
            "model_id": self.model.model_id,
            "confidence": self.confidence,
            "confidence_threshold": self.confidence_threshold,
            # only when set, so that float32 run ids stay what they were before the option existed
            **({"precision": self.precision} if self.precision != "float32" else {}),
            **({"max_pixels": self.max_pixels} if self.max_pixels != DEFAULT_MAX_PIXELS else {}),
        }

    def describe(self, resources: dict[str, Any]) -> dict[str, Any]:
        """The run manifest's input, vocabulary, model and config sections (``resources``: the actor pool)."""
        num_classes = len(self.vocabulary)
        return {
            "input": {"uri": self.input_uri, "manifest": self.manifest_uri, "uri_column": self.uri_column,
                      "limit": self.limit},
            "vocabulary": {"vocab_id": self.vocabulary.vocab_id, "source": self.vocabulary.source,
                           "names": list(self.vocabulary.names)},
            "model": {"id": self.model.model_id, "uri": self.model.uri},
            "config": {"batch_size": self.batch_size, "retry_errors": self.retry_errors,
                       "confidence": self.confidence,
                       "confidence_threshold": self.confidence_threshold,
                       "low_confidence_below": self.review_threshold,
                       "mask_bits": 8 * mask_dtype(num_classes).itemsize,
                       "unlabelled_value": unlabelled_value_for(num_classes), "rows_per_file": self.rows_per_file,
                       **resources},
        }  # fmt: skip

    @property
    def review_threshold(self) -> float:
        """Pixels below this probability count in ``low_confidence_fraction``: the confidence threshold, or 0.5."""
        return REVIEW_THRESHOLD if self.confidence_threshold is None else self.confidence_threshold

    @property
    def block_rows(self) -> int:
        """Rows per Ray Data block from read to write: the to-do files' row group size."""
        return min(self.rows_per_file, TODO_ROWS_PER_FILE)

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        digest = hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
        return f"run-{digest}"
