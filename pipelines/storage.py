"""Object-storage helpers over fsspec: one place that turns URIs (s3://, gs://, file paths) into files.

Endpoints and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for any
fsspec / botocore client.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path inside it."""
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise ValueError(f"cannot open {uri!r}: {err}") from err


def protocol_prefix(uri: str) -> str:
    """'s3://' for s3 URIs, '' for local paths: prepended to fsspec paths to get URIs back."""
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts)


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Sorted URIs of the files under a prefix/directory, matching a glob, or the file itself.

    ``suffixes`` filters by extension (case-insensitive). Raises FileNotFoundError when nothing is there.
    """
    fs, path = filesystem(uri)
    prefix = protocol_prefix(uri)
    if any(ch in path for ch in "*?["):
        paths = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isfile(path):
        paths = [path]
    elif fs.isdir(path):
        paths = fs.find(path)
    else:
        raise FileNotFoundError(f"nothing found at {uri}: check the bucket/prefix or path")
    if suffixes is not None:
        paths = [p for p in paths if p.lower().endswith(suffixes)]
    return sorted(prefix + p if prefix and not p.startswith(prefix) else p for p in paths)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def check_writable(uri: str) -> None:
    """Write and delete a probe object under ``uri``; raise PermissionError with the URI if that fails."""
    fs, path = filesystem(uri)
    probe = posixpath.join(path.rstrip("/"), f".write-probe-{uuid.uuid4().hex}")
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as err:  # every backend raises its own types
        raise PermissionError(f"cannot write under {uri}: {err}") from err
