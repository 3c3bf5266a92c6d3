"""Evaluation by the paper's protocol: a benchmark's (image, label) pairs -> the shared model stage -> summed
confusion matrices -> mIoU and the per-class report.

    run.py      EvaluationConfig, evaluate: the Ray Data chain
    sets.py     the paper's benchmark layouts as data, and the read stage
    report.py   EvaluationResult, the JSON report, the printed table and headline
    labels.py   a labelling run's stored masks against reviewed annotations (no model)
"""

from __future__ import annotations

from pipelines.lazy import lazy_exports

# public name -> the module that defines it
_HOMES = {
    "EvaluationConfig": "run",
    "evaluate": "run",
    "BENCHMARKS": "sets",
    "REVIEWED_FORMATS": "sets",
    "load_benchmark": "sets",
    "read_reviewed": "sets",
    "evaluate_labels": "labels",
    "EvaluationResult": "report",
    "format_table": "report",
    "headline": "report",
    "write_report": "report",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
