"""The loopback Hub file endpoint (tests/hf_endpoint.py) against the real huggingface_hub client, in subprocesses."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hf_endpoint import HubFileServer, run_hub_snippet

REPO = "acme/catseg-demo"
CONFIG = b'{"model": "catseg", "classes": 171}\n'
WEIGHTS = os.urandom(64 * 1024)  # above lfs_threshold below: served like an LFS file, through the CDN origin
FILES = {("space", REPO, "config.json"): CONFIG, ("space", REPO, "weights/model.bin"): WEIGHTS}
CONTENT = {"config.json": CONFIG, "weights/model.bin": WEIGHTS}

# Prints the downloaded path, or the class names of the raised exception (its MRO, to check base classes too).
DOWNLOAD = """
import json
import huggingface_hub
kwargs = {kwargs!r}
try:
    print(json.dumps({{"path": huggingface_hub.hf_hub_download(**kwargs)}}))
except Exception as error:
    print(json.dumps({{"error": [cls.__name__ for cls in type(error).__mro__]}}))
"""


def download(server_url: str, hf_home: Path, **kwargs: object) -> dict:
    result = run_hub_snippet(DOWNLOAD.format(kwargs=kwargs), server_url, hf_home, timeout=60)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def server():
    with HubFileServer(FILES, lfs_threshold=16 * 1024) as hub:
        yield hub


@pytest.mark.parametrize("filename", ["config.json", "weights/model.bin"])
def test_download_then_served_from_cache(server: HubFileServer, tmp_path: Path, filename: str):
    assert server.is_lfs("space", REPO, filename) == (filename == "weights/model.bin")
    first = download(server.url, tmp_path, repo_id=REPO, filename=filename, repo_type="space")
    path = Path(first["path"])
    assert path.read_bytes() == CONTENT[filename]
    assert path.is_relative_to(tmp_path / "hub")
    # the cache names the blob after the etag the server sent: git sha1 for regular files, sha256 for LFS ones
    assert path.resolve().name == server.etag("space", REPO, filename)
    assert server.downloads("space", REPO, filename) == 1

    again = download(server.url, tmp_path, repo_id=REPO, filename=filename, repo_type="space")
    by_sha = download(
        server.url, tmp_path, repo_id=REPO, filename=filename, repo_type="space", revision=server.revision_sha
    )
    assert again["path"] == by_sha["path"] == first["path"]
    assert server.downloads("space", REPO, filename) == 1  # the later calls made at most a HEAD
    # one GET in all: for an LFS file it goes straight to the CDN location the HEAD's 302 named
    gets = [path for method, path in server.requests if method == "GET"]
    assert len(gets) == 1
    assert gets[0].startswith("/repos/") == server.is_lfs("space", REPO, filename)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"repo_id": REPO, "filename": "config.json"}, "RepositoryNotFoundError"),  # a space asked for as a model
        ({"repo_id": "acme/absent", "filename": "config.json", "repo_type": "dataset"}, "RepositoryNotFoundError"),
        ({"repo_id": REPO, "filename": "missing.txt", "repo_type": "space"}, "RemoteEntryNotFoundError"),
        ({"repo_id": REPO, "filename": "config.json", "repo_type": "space", "revision": "v9"}, "RevisionNotFoundError"),
    ],
)
def test_errors_map_to_huggingface_hub_exceptions(server: HubFileServer, tmp_path: Path, kwargs: dict, expected: str):
    result = download(server.url, tmp_path, **kwargs)
    assert result["error"][0] == expected
    if expected == "RemoteEntryNotFoundError":
        assert "EntryNotFoundError" in result["error"]  # the public base class callers catch
    assert server.downloads("space", REPO, "config.json") == 0


def test_cached_file_survives_the_server_going_away(server: HubFileServer, tmp_path: Path):
    first = download(server.url, tmp_path, repo_id=REPO, filename="weights/model.bin", repo_type="space")
    server.stop()
    # connection refused on the HEAD call: huggingface_hub falls back to refs/main in the cache
    again = download(server.url, tmp_path, repo_id=REPO, filename="weights/model.bin", repo_type="space")
    assert again["path"] == first["path"]
    assert Path(again["path"]).read_bytes() == WEIGHTS
    # (an uncached file is not tried here: huggingface_hub then retries the HEAD with backoff for ~20 s)


def test_range_requests(server: HubFileServer):
    url = server.resolve_url("space", REPO, "config.json")
    size = len(CONFIG)
    for header, start, stop in [("bytes=3-9", 3, 10), ("bytes=5-", 5, size), ("bytes=-4", size - 4, size)]:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": header}), timeout=10) as response:
            assert response.status == 206
            assert response.read() == CONFIG[start:stop]
            assert response.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
            assert not any(name.lower().startswith("x-xet") for name in response.headers)  # plain HTTP only
    # an LFS file: urllib follows the 302 to the CDN origin and keeps the Range header, as huggingface_hub's GET does
    lfs_url = server.resolve_url("space", REPO, "weights/model.bin")
    with urllib.request.urlopen(urllib.request.Request(lfs_url, headers={"Range": "bytes=1000-"}), timeout=10) as r:
        assert (r.status, r.read()) == (206, WEIGHTS[1000:])
    with pytest.raises(urllib.error.HTTPError) as unsatisfiable:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={size}-"}), timeout=10)
    assert unsatisfiable.value.code == 416
    assert unsatisfiable.value.headers["Content-Range"] == f"bytes */{size}"
