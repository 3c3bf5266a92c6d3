"""Fine-tuning on Ray Train: the q/v projections of both CLIP encoders plus aggregator and decoder.

run.py          FinetuneConfig, run_finetuning and the per-worker training loop
sources.py      where training pairs come from (the paper's layouts, pair manifests) and the up-front checks
datasets.py     the data pipeline on Ray Data (read, decode, augment)
augment.py      CAT-Seg's training augmentation
checkpoints.py  checkpoints on storage and resuming from them
validation.py   the mIoU of the current weights on held-out pairs
"""

from __future__ import annotations

from pipelines.lazy import lazy_exports

# public name -> the module that defines it
_HOMES = {
    "FinetuneConfig": "config",
    "check_inputs": "run",
    "run_finetuning": "run",
    "LAYOUTS": "config",
    "load_dataset": "sources",
    "checkpoint_uri": "checkpoints",
    "list_checkpoints": "checkpoints",
    "resume_point": "checkpoints",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
