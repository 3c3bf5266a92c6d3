"""A loopback stand-in for the Hugging Face Hub file endpoint (``/resolve/``), for tests.

``HubFileServer`` answers ``HEAD``/``GET /<repo>/resolve/<revision>/<filename>`` the way huggingface.co does, so the
real ``huggingface_hub`` client's ``hf_hub_download`` (and what builds on it, e.g. ``open_clip``'s hub loading) can
run against it with ``HF_ENDPOINT`` pointed at ``server.url``. The ``/api/`` routes (``snapshot_download``,
``list_repo_files``, ``model_info``) are not emulated: they get a logged 404 ``RepoNotFound``.

* regular files: ``200`` with ``X-Repo-Commit``, ``ETag`` (the git blob sha1, like the Hub), ``Content-Length`` and
  ``Accept-Ranges``; ``Range`` requests get ``206`` + ``Content-Range``.
* files of ``lfs_threshold`` bytes or more behave like LFS files: ``/resolve/`` answers ``302`` with ``X-Linked-Etag``
  (the sha256), ``X-Linked-Size`` and a ``Location`` on a second loopback origin that plays the CDN. It must be
  another origin: huggingface_hub follows same-origin redirects of its HEAD call and would then read the file
  metadata from the CDN's answer, which (like the real CDN) carries no ``X-Repo-Commit``.
* errors carry the ``X-Error-Code`` huggingface_hub maps to exceptions: ``RepoNotFound`` ->
  ``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``, ``EntryNotFound`` ->
  ``RemoteEntryNotFoundError`` (a subclass of ``EntryNotFoundError``).
* no Xet headers (``X-Xet-Hash``, ``Link: rel="xet-auth"``), so clients with ``hf_xet`` installed still use plain HTTP.

huggingface_hub reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE``/``HF_HOME`` once, at import, and the test suite sets
``HF_HUB_OFFLINE=1`` for its own process: drive the client in a subprocess with ``hub_env()`` / ``run_hub_snippet()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
# URL prefix of each repo type on the Hub (models have none)
_URL_PREFIXES = {"dataset": "datasets", "space": "spaces"}
_PREFIX_TO_TYPE = {prefix: repo_type for repo_type, prefix in _URL_PREFIXES.items()}

DEFAULT_REVISION_SHA = hashlib.sha1(b"tests/hf_endpoint.py").hexdigest()
DEFAULT_BRANCH = "main"
# The Hub requires LFS for files above 10 MB.
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
_CHUNK = 1024 * 1024
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_SHA_RE = re.compile(r"[0-9a-f]{40}")

FileKey = tuple[str, str, str]  # (repo_type, repo_id, filename)


@dataclass(frozen=True)
class _Blob:
    source: bytes | Path
    size: int
    sha256: str
    git_sha1: str  # what the Hub sends as ETag for a file stored in git (not LFS)

    @classmethod
    def of(cls, source: bytes | Path) -> _Blob:
        sha256 = hashlib.sha256()
        size = 0
        for chunk in _iter_source(source, 0, None):
            sha256.update(chunk)
            size += len(chunk)
        git = hashlib.sha1(b"blob %d\0" % size)
        for chunk in _iter_source(source, 0, None):
            git.update(chunk)
        return cls(source=source, size=size, sha256=sha256.hexdigest(), git_sha1=git.hexdigest())


def _iter_source(source: bytes | Path, start: int, stop: int | None) -> Iterator[bytes]:
    """Chunks of ``source[start:stop]``; a Path is streamed, so large checkpoints are never held in memory."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = memoryview(source)[start:stop]
        for offset in range(0, len(data), _CHUNK):
            yield bytes(data[offset : offset + _CHUNK])
        return
    with open(source, "rb") as f:
        f.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


@dataclass(frozen=True)
class _Logged:
    method: str
    path: str
    status: int
    key: FileKey | None  # the file whose bytes this answer carried, if any
    origin: str  # "hub" or "cdn"


def resolve_path(repo_type: str, repo_id: str, filename: str, revision: str = DEFAULT_BRANCH) -> str:
    """The ``/resolve/`` path huggingface_hub requests for a file, quoted the same way (``hf_hub_url``)."""
    prefix = _URL_PREFIXES.get(repo_type)
    repo = f"{prefix}/{repo_id}" if prefix else repo_id
    return f"/{repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"


class HubFileServer:
    """Serves ``files`` like the Hub's file endpoint on 127.0.0.1; ``url`` is what ``HF_ENDPOINT`` should be.

    ``files`` maps ``(repo_type, repo_id, filename)`` to the content (bytes, or a Path streamed from disk). Every repo
    has one commit, ``revision_sha``, reachable as ``main`` or by the sha itself. ``requests`` logs ``(method, path)``
    for both origins (hub and CDN) in arrival order; ``downloads(key)`` counts the answers that carried a file's bytes.
    """

    def __init__(
        self,
        files: Mapping[FileKey, bytes | Path],
        revision_sha: str = DEFAULT_REVISION_SHA,
        *,
        lfs_threshold: int | None = DEFAULT_LFS_THRESHOLD,
    ) -> None:
        if not _SHA_RE.fullmatch(revision_sha):
            raise ValueError(f"revision_sha must be 40 lowercase hex digits, got {revision_sha!r}")
        self.revision_sha = revision_sha
        self.lfs_threshold = lfs_threshold
        self._files: dict[FileKey, _Blob] = {}
        for (repo_type, repo_id, filename), source in files.items():
            if repo_type not in REPO_TYPES:
                raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
            self._files[(repo_type, repo_id, filename)] = _Blob.of(source)
        self._repos = {(repo_type, repo_id) for repo_type, repo_id, _ in self._files}
        self._log: list[_Logged] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.cdn_url = ""

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> HubFileServer:
        if self._servers:
            return self
        hub = _QuietServer(("127.0.0.1", 0), _HubHandler, self)
        cdn = _QuietServer(("127.0.0.1", 0), _CdnHandler, self)
        self._servers = [hub, cdn]
        self.url = f"http://127.0.0.1:{hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn.server_address[1]}"
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening; afterwards connections are refused, as when the Hub is unreachable."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> HubFileServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what tests look at ------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """A snapshot of ``(method, path)`` of every request so far, hub and CDN origins alike."""
        with self._lock:
            return [(entry.method, entry.path) for entry in self._log]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    def downloads(self, repo_type: str, repo_id: str, filename: str) -> int:
        """How many GET answers carried (some of) this file's bytes, from /resolve/ or from the CDN."""
        key = (repo_type, repo_id, filename)
        with self._lock:
            return sum(1 for e in self._log if e.method == "GET" and e.key == key and e.status in (200, 206))

    def is_lfs(self, repo_type: str, repo_id: str, filename: str) -> bool:
        return self._is_lfs(self._files[(repo_type, repo_id, filename)])

    def etag(self, repo_type: str, repo_id: str, filename: str) -> str:
        """The etag huggingface_hub names the cached blob after: sha256 for LFS files, git blob sha1 otherwise."""
        blob = self._files[(repo_type, repo_id, filename)]
        return blob.sha256 if self._is_lfs(blob) else blob.git_sha1

    def resolve_url(self, repo_type: str, repo_id: str, filename: str, revision: str = DEFAULT_BRANCH) -> str:
        return self.url + resolve_path(repo_type, repo_id, filename, revision)

    # -- internals used by the handlers ------------------------------------------------------------------------

    def _is_lfs(self, blob: _Blob) -> bool:
        return self.lfs_threshold is not None and blob.size >= self.lfs_threshold

    def _record(self, entry: _Logged) -> None:
        with self._lock:
            self._log.append(entry)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True  # a client that keeps a connection open must not block stop()

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: HubFileServer) -> None:
        self.hub = hub
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-body (a cancelled or resumed download) is normal traffic, not a server bug.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _BaseHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 for 206/Content-Range semantics, but every answer closes its connection: a pooled keep-alive
    # connection would otherwise keep being served after stop().
    protocol_version = "HTTP/1.1"
    server: _QuietServer
    origin = "hub"

    def log_message(self, format: str, *args: Any) -> None:  # the default writes every request to stderr
        pass

    @property
    def hub(self) -> HubFileServer:
        return self.server.hub

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    # Anything else (uploads, API calls) is outside this emulation: answer like an unknown repo, but log it.
    def _other_method(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._error(404, "RepoNotFound", "Repository Not Found", send_body=True)

    def do_POST(self) -> None:
        self._other_method()

    def do_PUT(self) -> None:
        self._other_method()

    def do_PATCH(self) -> None:
        self._other_method()

    def do_DELETE(self) -> None:
        self._other_method()

    def _dispatch(self, send_body: bool) -> None:
        raise NotImplementedError

    # -- responses ---------------------------------------------------------------------------------------------

    def _finish_log(self, status: int, key: FileKey | None = None) -> None:
        self.hub._record(_Logged(self.command, self.path, status, key, self.origin))

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        send_body: bool,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code is not None:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        self._finish_log(status)

    def _serve_blob(
        self, blob: _Blob, key: FileKey, etag: str, headers: Mapping[str, str], filename: str, send_body: bool
    ) -> None:
        start, stop = 0, blob.size
        status = 200
        spec = self._range_of(blob.size)
        if spec == "unsatisfiable":
            self._error(
                416, None, "Requested Range Not Satisfiable", send_body, {"Content-Range": f"bytes */{blob.size}"}
            )
            return
        if spec is not None:
            start, stop = spec
            status = 206
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", _content_disposition(filename))
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{blob.size}")
        self.send_header("Connection", "close")
        self.end_headers()
        # Logged before the body goes out, so a test that reads the log right after the client returns sees it.
        self._finish_log(status, key if send_body else None)
        if send_body:
            for chunk in _iter_source(blob.source, start, stop):
                self.wfile.write(chunk)

    def _range_of(self, size: int) -> tuple[int, int] | str | None:
        """``(start, stop)`` for a satisfiable single ``Range``; None to serve it whole (no or unusable header)."""
        header = self.headers.get("Range")
        if not header:
            return None
        match = _RANGE_RE.fullmatch(header.strip())
        if match is None:  # multiple ranges or another unit: RFC 9110 lets a server ignore it and send 200
            return None
        first, last = match.groups()
        if not first and not last:
            return None
        if not first:  # suffix range: the last N bytes
            suffix = int(last)
            if suffix == 0:
                return "unsatisfiable"
            return max(size - suffix, 0), size
        start = int(first)
        if last and int(last) < start:
            return None  # invalid range: ignored
        if start >= size:
            return "unsatisfiable"
        stop = size if not last else min(int(last) + 1, size)
        return start, stop


class _HubHandler(_BaseHandler):
    origin = "hub"

    def _dispatch(self, send_body: bool) -> None:
        hub = self.hub
        parsed = _parse_resolve(urlsplit(self.path).path, hub._repos)
        if parsed is None:
            self._error(404, "RepoNotFound", "Repository Not Found", send_body)
            return
        repo_type, repo_id, revision, filename = parsed
        if (repo_type, repo_id) not in hub._repos:
            self._error(404, "RepoNotFound", "Repository Not Found", send_body)
            return
        if revision not in (DEFAULT_BRANCH, hub.revision_sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
            return
        key = (repo_type, repo_id, filename)
        blob = hub._files.get(key)
        commit = {"X-Repo-Commit": hub.revision_sha}
        if blob is None:
            # The Hub names the commit on a missing entry too; huggingface_hub caches the absence under it (.no_exist).
            self._error(404, "EntryNotFound", "Entry not found", send_body, commit)
            return
        if not hub._is_lfs(blob):
            self._serve_blob(blob, key, blob.git_sha1, commit, filename, send_body)
            return
        location = f"{hub.cdn_url}/{_cdn_path(repo_type, repo_id, blob.sha256)}?filename={quote(filename, safe='')}"
        body = f"Found. Redirecting to {location}".encode()
        self.send_response(302)
        self.send_header("X-Repo-Commit", hub.revision_sha)
        # The file's own etag and size: huggingface_hub ignores Content-Length on a redirect.
        self.send_header("X-Linked-Etag", f'"{blob.sha256}"')
        self.send_header("X-Linked-Size", str(blob.size))
        self.send_header("ETag", f'"{_lfs_pointer_sha1(blob)}"')  # the Hub's ETag here is the pointer file's
        self.send_header("Location", location)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        self._finish_log(302)


class _CdnHandler(_BaseHandler):
    """The CDN origin of LFS files: content addressed, and without the Hub's X-Repo-Commit / X-Error-Code headers."""

    origin = "cdn"

    def _dispatch(self, send_body: bool) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        query = dict(part.split("=", 1) for part in split.query.split("&") if "=" in part)
        filename = unquote(query.get("filename", ""))
        for key, blob in hub._files.items():
            repo_type, repo_id, name = key
            if hub._is_lfs(blob) and "/" + _cdn_path(repo_type, repo_id, blob.sha256) == split.path:
                # Several files of a repo may share content: credit the one the redirect named.
                if name != filename and (repo_type, repo_id, filename) in hub._files:
                    key = (repo_type, repo_id, filename)
                self._serve_blob(blob, key, blob.sha256, {}, filename or blob.sha256, send_body)
                return
        self._error(404, None, "Not Found", send_body)


def _cdn_path(repo_type: str, repo_id: str, sha256: str) -> str:
    return f"repos/{repo_type}s/{quote(repo_id)}/{sha256}"


def _lfs_pointer_sha1(blob: _Blob) -> str:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{blob.sha256}\nsize {blob.size}\n".encode()
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


def _content_disposition(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    return f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name.encode('ascii', 'replace').decode()}\";"


def _parse_resolve(path: str, repos: set[tuple[str, str]]) -> tuple[str, str, str, str] | None:
    """``(repo_type, repo_id, revision, filename)`` of a ``/resolve/`` path, or None for any other path.

    Split before unquoting: huggingface_hub quotes the revision with ``safe=""`` (``refs/pr/1`` is one segment) and
    the filename with ``/`` kept. A repo id is ``name`` or ``namespace/name``; where both readings parse, the one
    naming a held repo wins.
    """
    parts = path.lstrip("/").split("/")
    repo_type = "model"
    if parts and parts[0] in _PREFIX_TO_TYPE:
        repo_type = _PREFIX_TO_TYPE[parts[0]]
        parts = parts[1:]
    candidates = []
    for n in (2, 1):
        if len(parts) >= n + 3 and parts[n] == "resolve":
            repo_id = unquote("/".join(parts[:n]))
            candidates.append((repo_type, repo_id, unquote(parts[n + 1]), unquote("/".join(parts[n + 2 :]))))
    for candidate in candidates:
        if candidate[:2] in repos:
            return candidate
    return candidates[0] if candidates else None


# -- running the real client against the server ----------------------------------------------------------------

# Variables that would point huggingface_hub elsewhere than HF_HOME, send a token, or switch it offline.
_DROPPED_VARIABLES = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_ENABLE_HF_TRANSFER",
)


def hub_env(server_url: str, hf_home: str | os.PathLike[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess whose huggingface_hub talks to ``server_url`` and caches under ``hf_home``."""
    env = dict(os.environ if base is None else base)
    for name in _DROPPED_VARIABLES:
        env.pop(name, None)
    env.update(
        HF_ENDPOINT=server_url,
        HF_HOME=os.fspath(hf_home),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",  # hf_xet is installed; never let it take over from plain HTTP
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    # A proxy from the environment must not intercept loopback traffic (httpx honours *_PROXY variables).
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in env.get(name, "").split(",") if h]
        env[name] = ",".join([*hosts, "127.0.0.1", "localhost"])
    return env


def run_hub_snippet(
    code: str,
    server_url: str,
    hf_home: str | os.PathLike[str],
    *,
    timeout: float = 60,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` with ``hub_env``; with ``check``, a failure raises with the snippet's stderr."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=hub_env(server_url, hf_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snippet exited with {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result
