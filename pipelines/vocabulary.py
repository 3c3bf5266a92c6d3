"""Vocabularies for labelling runs: a comma list, a text/JSON file (local or any fsspec URI), or a built-in preset.

File formats: text with one class per line ("name, synonym" allowed: the first synonym is the prompt name,
blank lines and lines starting with "#" are skipped), or JSON (a list of names, or ``{"classes": [...]}``).
Presets live in ``pipelines/presets/<name>.txt`` and are the CAT-Seg evaluation vocabularies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from catseg import validate_vocabulary
from pipelines import storage

PRESET_DIR = Path(__file__).parent / "presets"
# A class name is a few words; anything longer is most likely a caption or a file passed by mistake.
MAX_CLASS_NAME_CHARS = 200


@dataclass(frozen=True)
class Vocabulary:
    """Validated class names (index = class id in the masks) and where they came from."""

    names: tuple[str, ...]
    source: str  # "list", "file:<uri>" or "preset:<name>"

    @property
    def vocab_id(self) -> str:
        """Stable id of the exact name list (order matters: it defines the class ids)."""
        digest = hashlib.sha256("\n".join(self.names).encode("utf-8")).hexdigest()[:16]
        return f"{len(self.names)}c-{digest}"

    def __len__(self) -> int:
        return len(self.names)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.txt"))


def check_names(names: list[str], source: str) -> tuple[str, ...]:
    """catseg.validate_vocabulary plus a length limit per name; errors name the source."""
    try:
        cleaned = validate_vocabulary(names)
    except (TypeError, ValueError) as err:
        raise ValueError(f"vocabulary from {source}: {err}") from err
    for i, name in enumerate(cleaned):
        if len(name) > MAX_CLASS_NAME_CHARS:
            raise ValueError(
                f"vocabulary from {source}: class name #{i} is {len(name)} characters long "
                f"(at most {MAX_CLASS_NAME_CHARS}); is this a caption or the wrong file?"
            )
    return tuple(cleaned)


def parse_vocabulary_text(text: str, source: str = "text") -> tuple[str, ...]:
    """Names from the contents of a vocabulary file (JSON list / object, or one class per line)."""
    stripped = text.lstrip("\ufeff").strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"vocabulary file {source} looks like JSON but does not parse: {err}") from err
        if isinstance(data, dict):
            data = data.get("classes", data.get("class_names"))
        if not isinstance(data, list):
            raise ValueError(f"vocabulary file {source}: JSON must be a list of names or {{'classes': [...]}}")
        return check_names(data, source)
    lines = [line.strip() for line in stripped.splitlines()]
    return check_names([line for line in lines if line and not line.startswith("#")], source)


def read_class_list(uri: str) -> list[str]:
    """A class-names file whose line order gives the class ids (datasets, benchmarks): one name per line, lines
    starting with '#' are comments, blank lines at the end are fine; a blank line inside is refused, since it would
    shift every later id. (Vocabulary files for labelling, where order does not matter, go through
    :func:`load_vocabulary`, which also reads JSON and skips blank lines.)"""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"class-names file not found: {uri}") from err
    numbered = [(i + 1, line) for i, line in enumerate(text.lstrip("\ufeff").splitlines())]
    numbered = [(n, line) for n, line in numbered if not line.lstrip().startswith("#")]
    while numbered and not numbered[-1][1].strip():
        numbered.pop()
    blank = [n for n, line in numbered if not line.strip()]
    if blank:
        raise ValueError(f"{uri}: line {blank[0]} is empty; the file needs one class name per line (line order = id)")
    return list(check_names([line for _, line in numbered], uri))


def load_vocabulary(
    names: str | list[str] | None = None, *, file: str | None = None, preset: str | None = None
) -> Vocabulary:
    """Exactly one of: ``names`` ("a,b,c" or a list), ``file`` (URI of a text/JSON file), ``preset`` (a name)."""
    given = [k for k, v in (("names", names), ("file", file), ("preset", preset)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one vocabulary source (names, file or preset), got {given or 'none'}")
    if names is not None:
        items = names.split(",") if isinstance(names, str) else list(names)
        return Vocabulary(check_names(items, "the class list"), "list")
    if file is not None:
        try:
            text = storage.read_text(file)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"vocabulary file not found: {file}") from err
        return Vocabulary(parse_vocabulary_text(text, file), f"file:{file}")
    path = PRESET_DIR / f"{preset}.txt"
    if not path.is_file():
        raise ValueError(f"unknown vocabulary preset {preset!r}; choose one of {', '.join(list_presets())}")
    return Vocabulary(parse_vocabulary_text(path.read_text("utf-8"), f"preset {preset}"), f"preset:{preset}")
