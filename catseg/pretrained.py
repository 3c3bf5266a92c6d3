"""Released CAT-Seg weights by name, kept beside the model configs as open_clip keeps its pretrained tags.

The official checkpoints live in the Hugging Face *Space* ``hamacojr/CAT-Seg-weights`` (not a model repo). They are
fetched once into the Hugging Face cache through ``huggingface_hub``, so ``HF_ENDPOINT`` (mirrors), ``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens behave as users expect, then converted on load by the
official-checkpoint loader (:func:`catseg.convert.load_official_checkpoint`). Concurrent fetches of one file on one
machine share a single download (the cache's file lock), so model workers on one node download it once.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .config import get_config


@dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint: where it lives on the Hub and which architecture it holds."""

    name: str  # what users pass: catseg.load_model(name), --model name
    architecture: str  # model config name the file must convert into
    repo_id: str
    repo_type: str  # "space": the official weights are files of a Space
    filename: str
    revision: str = "main"
    parameters_millions: float = 0.0  # of the converted model, for list_pretrained's size column

    @property
    def uri(self) -> str:
        """A readable, stable address of the file (also the model id recorded in labelling outputs)."""
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"hf://{kind}{self.repo_id}/{self.filename}"

    @property
    def size_mb(self) -> float:
        """Approximate size of the file: float32 weights of the converted model."""
        return self.parameters_millions * 4


_OFFICIAL_REPO = "hamacojr/CAT-Seg-weights"
PRETRAINED: dict[str, PretrainedWeights] = {
    weights.name: weights
    for weights in (
        PretrainedWeights("vit_b16", "vit_b16", _OFFICIAL_REPO, "space", "model_base.pth", parameters_millions=154.3),
        PretrainedWeights("vit_l14", "vit_l14", _OFFICIAL_REPO, "space", "model_large.pth", parameters_millions=433.7),
    )
}


class PretrainedUnavailableError(RuntimeError):
    """Released weights that are neither in the local cache nor fetchable (offline, unreachable, missing)."""


def list_pretrained() -> list[PretrainedWeights]:
    """The released checkpoints that :func:`catseg.load_model` accepts by name."""
    return [PRETRAINED[name] for name in sorted(PRETRAINED)]


def is_pretrained(name: str) -> bool:
    return name in PRETRAINED


def get_pretrained(name: str) -> PretrainedWeights:
    if name not in PRETRAINED:
        known = ", ".join(sorted(PRETRAINED))
        raise ValueError(f"no released weights named {name!r}; released: {known}")
    weights = PRETRAINED[name]
    get_config(weights.architecture)  # the registry never names an architecture we cannot build
    return weights


def _unavailable(weights: PretrainedWeights, err: BaseException) -> PretrainedUnavailableError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
    return PretrainedUnavailableError(
        f"cannot fetch released weights {weights.name!r} ({weights.uri}, revision {weights.revision}): "
        f"{type(err).__name__}: {reason}. Without access to the Hugging Face Hub, copy {weights.filename} here "
        f"and pass its path instead of the name (--checkpoint PATH), or set HF_ENDPOINT to a mirror"
    )


def _cached_path(weights: PretrainedWeights) -> str | None:
    """The file in the local Hugging Face cache, if there: no request at all (the released files do not change,
    and asking the Hub first would cost every model worker a HEAD, and retries for ~20 s when it is unreachable)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(
        weights.repo_id, weights.filename, revision=weights.revision, repo_type=weights.repo_type
    )
    return path if isinstance(path, str) else None


def _check_endpoint_reachable(timeout: float = 5.0) -> None:
    """Fail at once when the Hub's host cannot even be resolved or connected to: huggingface_hub would retry
    for about 25 s, logging each attempt, before giving the same answer. Skipped behind a proxy (the proxy, not
    this machine, reaches the Hub) and in offline mode (huggingface_hub answers from the cache at once)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    with socket.create_connection((endpoint.hostname, port), timeout=timeout):
        pass


def _hub_download(weights: PretrainedWeights, *, dry_run: bool = False) -> Any:
    from huggingface_hub import hf_hub_download

    try:
        _check_endpoint_reachable()
    except OSError as err:
        raise _unavailable(weights, ConnectionError(f"the Hub endpoint is unreachable ({err})")) from None
    try:
        return hf_hub_download(
            repo_id=weights.repo_id,
            filename=weights.filename,
            repo_type=weights.repo_type,
            revision=weights.revision,
            library_name="catseg-ray",
            dry_run=dry_run,
        )
    except Exception as err:  # offline mode, DNS, 404, timeouts: one answer with what to do instead
        raise _unavailable(weights, err) from None


def fetch_pretrained(name: str) -> str:
    """Local path of a released checkpoint: from the Hugging Face cache, downloaded there on first use."""
    weights = get_pretrained(name)
    return _cached_path(weights) or _hub_download(weights)


def check_pretrained(name: str) -> tuple[bool, int | None]:
    """(cached here, file size in bytes) without downloading: a HEAD request, or the cache when offline.

    Raises :class:`PretrainedUnavailableError` when the file is neither cached nor reachable.
    """
    weights = get_pretrained(name)
    cached = _cached_path(weights)
    if cached is not None:
        return True, os.path.getsize(cached)
    info = _hub_download(weights, dry_run=True)
    return info.is_cached, info.file_size
