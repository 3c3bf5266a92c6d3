"""Which model a job runs: a released name, a checkpoint, or a fine-tuning run, resolved once on the driver.

Every job (label, evaluate, finetune's --init-checkpoint) goes through :func:`resolve_model`, so the same strings
mean the same model everywhere. The driver checks the checkpoint cheaply (config, safetensors header, .pth keys,
or the released file's availability) before Ray starts; model workers then load ``ModelSource.uri`` with
``catseg.load_model``, which fetches released weights into each node's Hugging Face cache once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines import storage

# A fine-tuning run writes RUN/step_NNNNNNNN/model/ (pipelines.training.checkpoints)
CHECKPOINT_PREFIX = "step_"
MODEL_DIR = "model"
STEP_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass(frozen=True)
class ModelSource:
    """Where model workers load the model from, and the id written into every output row."""

    uri: str  # a released name (catseg.list_pretrained), a catseg checkpoint directory, or an official .pth
    model_id: str
    architecture: str


def resolve_checkpoint(uri: str) -> str:
    """The model directory inside a fine-tuning checkpoint (``RUN/step_N``) or run (its latest step); any other
    URI unchanged."""
    import catseg

    if catseg.is_official_checkpoint(uri) or storage.exists(storage.join(uri, "config.json")):
        return uri
    if storage.exists(storage.join(uri, MODEL_DIR, "config.json")):
        return storage.join(uri, MODEL_DIR)
    fs, path = storage.filesystem(uri)
    if not fs.isdir(path):
        return uri  # the model loader explains what is missing
    steps = []
    for entry in fs.ls(path, detail=False):
        match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        model_dir = storage.join(uri, match.group(0), MODEL_DIR) if match else None
        if model_dir and storage.exists(storage.join(model_dir, "config.json")):
            steps.append((int(match.group(1)), model_dir))
    return max(steps)[1] if steps else uri


def resolve_model(name: str | None = None, checkpoint: str | None = None) -> ModelSource:
    """Check on the driver that the model can be loaded, without loading it; fails with a one-line reason.

    ``name``: released weights (``vit_b16``, ``vit_l14``). ``checkpoint``: a released name too, a catseg
    checkpoint directory, an official .pth, or a fine-tuning run / step directory.
    """
    import catseg

    if (name is None) == (checkpoint is None):
        raise ValueError("give exactly one of a model name or a checkpoint URI")
    if checkpoint is not None and catseg.is_pretrained(checkpoint):
        name, checkpoint = checkpoint, None
    if name is not None:
        released = {weights.name: weights for weights in catseg.list_pretrained()}
        if name not in released:
            if name in catseg.list_models():
                raise ValueError(
                    f"model {name!r} has no released weights; released: {', '.join(released)}; "
                    "or pass --checkpoint URI (e.g. from catseg.save_model)"
                )
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(released)} or pass --checkpoint URI")
        architecture = catseg.check_checkpoint(name).name
        return ModelSource(name, f"{name}@{released[name].uri}", architecture)
    with storage.access_errors("read", checkpoint):
        uri = resolve_checkpoint(checkpoint)
        architecture = catseg.check_checkpoint(uri).name
    if catseg.is_official_checkpoint(uri):
        return ModelSource(uri, uri, architecture)
    return ModelSource(uri, f"{architecture}@{uri}", architecture)
