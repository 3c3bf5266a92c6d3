"""Object-storage helpers over fsspec: one place that turns URIs (s3://, gs://, file paths) into files.

Endpoints and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for any
fsspec / botocore client.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# Every format images.decode_image reads (Pillow, plus pillow-heif for HEIC/HEIF).
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".avif", ".heic", ".heif", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".tga",
)  # fmt: skip


def normalize_uri(uri: str) -> str:
    """One spelling per location: ``DIR``, ``DIR/`` and ``./DIR`` are the same input (and the same run).

    Local paths become absolute (Ray workers need not share the driver's working directory); remote URIs lose
    trailing slashes."""
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else uri
    path = uri.removeprefix("file://")
    return os.path.abspath(os.path.expanduser(path))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path inside it."""
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise ValueError(f"cannot open {uri!r}: {err}") from err


def protocol_prefix(uri: str) -> str:
    """'s3://' for s3 URIs, '' for local paths: prepended to fsspec paths to get URIs back."""
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def with_protocol(prefix: str, path: str) -> str:
    """A path from an fsspec listing back as a URI (``prefix`` from :func:`protocol_prefix`)."""
    return prefix + path if prefix and not path.startswith(prefix) else path


def is_hidden(path: str) -> bool:
    """Hidden and underscore names: temporary files, and metadata beside data (Spark's and our convention)."""
    return posixpath.basename(path).startswith((".", "_"))


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts)


class StorageAccessError(PermissionError):
    """Storage that could not be reached or read: no credentials, access denied, endpoint down."""


@contextlib.contextmanager
def access_errors(action: str, uri: str) -> Iterator[None]:
    """Turn a backend's own exception types (botocore, gcsfs, aiohttp, ...) into one line naming the URI."""
    try:
        yield
    except (FileNotFoundError, StorageAccessError, ValueError, RuntimeError):
        raise  # already say what is wrong (our own checks, a missing object)
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise StorageAccessError(f"cannot {action} {uri}: {reason}") from err


def list_files(uri: str, suffixes: tuple[str, ...] | None = None, skipped: Counter | None = None) -> list[str]:
    """Sorted URIs of the files under a prefix/directory, matching a glob, or the file itself.

    ``suffixes`` filters by extension (case-insensitive); ``skipped`` counts the extensions filtered out.
    Raises FileNotFoundError when nothing is there.
    """
    fs, path = filesystem(uri)
    prefix = protocol_prefix(uri)
    with access_errors("list", uri):
        if any(ch in path for ch in "*?["):
            paths = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isfile(path):
            paths = [path]
        elif fs.isdir(path):
            paths = fs.find(path)
        else:
            raise FileNotFoundError(f"nothing found at {uri}: check the bucket/prefix or path")
    if suffixes is not None:
        if skipped is not None:
            skipped.update(
                posixpath.splitext(p)[1].lower() or "(none)" for p in paths if not p.lower().endswith(suffixes)
            )
        paths = [p for p in paths if p.lower().endswith(suffixes)]
    return sorted(with_protocol(prefix, p) for p in paths)


def stem(uri: str) -> str:
    """The file name without its extension: how image and label files of one example are matched."""
    return posixpath.splitext(posixpath.basename(uri))[0]


def match_by_stem(keys: list[str], candidates: list[str]) -> tuple[dict[str, str], list[str]]:
    """({stem: candidate}, keys without a candidate of the same stem), e.g. images and their label files."""
    by_stem = {stem(uri): uri for uri in candidates}
    return by_stem, [uri for uri in keys if stem(uri) not in by_stem]


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def open_for_writing(uri: str) -> IO[bytes]:
    """A binary file at ``uri``, its parent made first (on object stores, an upload that completes on close)."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    return fs.open(path, "wb")


def write_bytes(uri: str, data: bytes) -> None:
    with open_for_writing(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with access_errors("read", uri):
        return fs.exists(path)


def check_writable(uri: str) -> None:
    """Write and delete a probe object under ``uri``; raise PermissionError with the URI if that fails."""
    fs, path = filesystem(uri)
    probe = posixpath.join(path.rstrip("/"), f".write-probe-{uuid.uuid4().hex}")
    try:
        created = not fs.exists(path)
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
        if created and isinstance(fs, LocalFileSystem):  # a refused run leaves no empty folder behind
            os.rmdir(path)
    except Exception as err:  # every backend raises its own types
        raise PermissionError(f"cannot write under {uri}: {err}") from err
