"""Class-name vocabularies: validation and the prompt text each name turns into."""

from __future__ import annotations

from collections.abc import Sequence

# Well past every benchmark (ADE-847); large enough for product catalogues, small enough to catch a file of
# captions passed by mistake. The model itself has no limit.
MAX_VOCABULARY_SIZE = 65535


def validate_vocabulary(class_names: Sequence[str]) -> list[str]:
    """Return the names stripped of surrounding space; refuse what cannot be a vocabulary."""
    if isinstance(class_names, str):
        raise TypeError("class names must be a list of strings, not one string; split it first, e.g. 'a,b'.split(',')")
    names = list(class_names)
    if not names:
        raise ValueError("the vocabulary is empty: give at least one class name")
    if len(names) > MAX_VOCABULARY_SIZE:
        raise ValueError(f"the vocabulary has {len(names)} classes; at most {MAX_VOCABULARY_SIZE} are supported")
    cleaned = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class name #{i} is {type(name).__name__}, not a string")
        name = name.strip()
        if not name or not prompt_name(name):
            raise ValueError(f"class name #{i} is empty")
        cleaned.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(cleaned):
        key = name.lower()
        if key in seen:
            raise ValueError(
                f"duplicate class name {name!r} at positions {seen[key]} and {i}: each class must appear once"
            )
        seen[key] = i
    return cleaned


def prompt_name(class_name: str) -> str:
    """The name used in the prompt: the first synonym of "building, edifice" style entries."""
    return class_name.split(",")[0].strip()
