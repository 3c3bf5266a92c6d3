"""Label Studio's formats, as Label Studio 1.2x writes them: the JSON export of a project (tasks with
``annotations[].result[]``), its labelling config (``<BrushLabels>`` with ``<Label value=...>``), brush regions as
RLE (label-studio-sdk's codec: a 4-channel image whose alpha is the mask), and the image references in
``data.image``.

Which annotation of a task counts: a ground-truth one first, else the newest (``updated_at``, then
``created_at``, then ``id``) not cancelled; a task with only cancelled annotations was skipped by its reviewer and is
left out, as is a task without annotations. Brush regions become one label by the rules of
:func:`pipelines.annotations.label_from_layers`.
"""

from __future__ import annotations

import json
import posixpath
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.annotations import ReviewedSet, add_readable, label_from_layers, must_exist
from pipelines.pairs import check_label_classes

LABEL_CONFIG_FILE = "label_config.xml"  # what our Label Studio export writes beside its tasks
UPLOAD_PREFIX = "/data/"  # Label Studio serves its uploaded files under /data/upload/...
LOCAL_FILES_PATH = "/data/local-files/"


class LabelStudioAccess:
    """How to read images that live in Label Studio itself (``/data/upload/...``): its URL and an API key, either
    a legacy token (``Authorization: Token``) or a personal access token (a JWT refresh token, exchanged at
    ``/api/token/refresh`` for an access token sent as ``Authorization: Bearer``). ``local_files_root`` is
    Label Studio's LOCAL_FILES_DOCUMENT_ROOT, under which ``/data/local-files/?d=`` paths are read."""

    def __init__(self, url: str | None = None, api_key: str | None = None, local_files_root: str | None = None):
        self.url = url.rstrip("/") if url else None
        self.api_key = api_key
        self.local_files_root = local_files_root
        self._header: str | None = None

    def authorization(self) -> str:
        if self._header is None:
            if not self.api_key:
                raise PermissionError("Label Studio's own files need an API key (LABEL_STUDIO_API_KEY)")
            if self.api_key.count(".") == 2:  # a personal access token is a JWT: exchange it for an access token
                request = urllib.request.Request(
                    f"{self.url}/api/token/refresh",
                    data=json.dumps({"refresh": self.api_key}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    self._header = f"Bearer {json.loads(response.read())['access']}"
            else:
                self._header = f"Token {self.api_key}"
        return self._header

    def fetch(self, path: str) -> bytes:
        """The bytes of a file Label Studio serves at ``path`` (``/data/upload/...``)."""
        if not self.url:
            raise ValueError(f"{path} is stored in Label Studio: give --label-studio-url (and LABEL_STUDIO_API_KEY)")
        request = urllib.request.Request(self.url + path, headers={"Authorization": self.authorization()})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()


def brush_label_names(config_xml: str) -> list[str]:
    """The class names of a labelling config: the ``value`` of each ``Label`` under its ``BrushLabels`` tag(s)."""
    root = ET.fromstring(config_xml)
    names = [label.get("value") for tag in root.iter("BrushLabels") for label in tag.iter("Label")]
    return [name for name in names if name]


def image_reference(task: dict[str, Any], image_key: str = "image") -> str | None:
    value = task.get("data", {}).get(image_key)
    return value if isinstance(value, str) and value else None


def resolve_image(reference: str, access: LabelStudioAccess) -> tuple[str, bool]:
    """(URI, whether it must be fetched from Label Studio with the API key) for a task's ``data.image``."""
    if reference.startswith(LOCAL_FILES_PATH):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(reference).query)
        relative = (query.get("d") or [""])[0]
        if not access.local_files_root:
            raise ValueError(f"{reference} is a Label Studio local file: give --local-files-root")
        return storage.join(access.local_files_root, relative), False
    if reference.startswith(UPLOAD_PREFIX):
        return reference, True
    if access.url and reference.startswith(access.url + UPLOAD_PREFIX):
        return reference[len(access.url) :], True
    return reference, False


def chosen_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """Ground truth first, else the newest annotation not cancelled; None when every one was cancelled."""
    kept = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not kept:
        return None

    def newest(annotation: dict[str, Any]) -> tuple:
        return (
            bool(annotation.get("ground_truth")),
            str(annotation.get("updated_at") or annotation.get("created_at") or ""),
            annotation.get("id") or 0,
        )

    return max(kept, key=newest)


def brush_layers(annotation: dict[str, Any]) -> tuple[tuple[int, int] | None, list[tuple[str, np.ndarray]]]:
    """(image shape, [(class name, mask)]) of an annotation's brush regions (other region types are not read)."""
    from label_studio_sdk.converter.brush import decode_rle

    shape, layers = None, []
    for result in annotation.get("result") or []:
        value = result.get("value") or {}
        if result.get("type") != "brushlabels" or value.get("format", "rle") != "rle" or not value.get("rle"):
            continue
        height, width = int(result["original_height"]), int(result["original_width"])
        if shape is not None and shape != (height, width):
            raise ValueError(f"its regions disagree on the image size ({shape[1]}x{shape[0]} and {width}x{height})")
        shape = (height, width)
        pixels = decode_rle(value["rle"])
        if pixels.size != height * width * 4:
            raise ValueError(f"a brush region holds {pixels.size} values, not {height}x{width}x4")
        mask = pixels.reshape(height, width, 4)[:, :, 3] > 127
        layers.extend((name, mask) for name in value.get("brushlabels") or [])
    return shape, layers


def read_export(
    export_uri: str,
    *,
    classes: Sequence[str] | None = None,
    label_config: str | None = None,
    access: LabelStudioAccess | None = None,
    image_key: str = "image",
    copy_uploads_to: str | None = None,
) -> ReviewedSet:
    """A Label Studio JSON export as reviewed images. Classes: ``classes``, else the labelling config
    (``label_config`` XML, else ``label_config.xml`` beside the export), else the brush labels in order of first
    appearance. Tasks that cannot be used (skipped, no brush, an image that is missing or needs access not given)
    are left out with a warning naming the task id; :attr:`ReviewedSet.skipped` lists them. Images stored in
    Label Studio itself (``/data/upload/...``) are fetched with ``access`` and copied to ``copy_uploads_to``, where
    workers can read them without Label Studio's key."""
    access = access or LabelStudioAccess()
    tasks = _read_tasks(export_uri)
    if classes is None:
        classes = export_class_names(export_uri, label_config, tasks)
    reviewed = ReviewedSet(export_uri, check_label_classes(classes, export_uri))
    ids = {name: i for i, name in enumerate(reviewed.class_names)}
    candidates: list[tuple[str, str, np.ndarray]] = []
    for task in tasks:
        key = f"task {task.get('id')}"
        annotation = chosen_annotation(task)
        reference = image_reference(task, image_key)
        if annotation is None:
            reviewed.skip(key, "skipped in Label Studio (every annotation cancelled)" if task.get("annotations")
                          else "no annotation")  # fmt: skip
            continue
        if reference is None:
            reviewed.skip(key, f"no data.{image_key}")
            continue
        try:
            shape, layers = brush_layers(annotation)
            if shape is None:
                reviewed.skip(key, "its annotation has no brush regions")
                continue
            reviewed.unknown_classes.update(name for name, _ in layers if name not in ids)
            label = label_from_layers(shape, [(ids.get(name), mask) for name, mask in layers])
        except Exception as err:  # a broken annotation costs its own task
            reviewed.skip(key, f"{type(err).__name__}: {err}")
            continue
        candidates.append((key, reference, label))

    def locate(reference: str) -> str:
        uri, in_label_studio = resolve_image(reference, access)
        if not in_label_studio:
            return must_exist(uri)
        if copy_uploads_to is None:
            raise ValueError(f"{uri} is stored in Label Studio and there is no folder to copy it to")
        copy = storage.join(copy_uploads_to, uri.strip("/").replace("/", "_"))  # the same name on every re-run
        storage.write_bytes(copy, access.fetch(uri))
        return copy

    add_readable(reviewed, candidates, locate)
    return reviewed


def _read_tasks(export_uri: str) -> list[dict[str, Any]]:
    with storage.access_errors("read", export_uri):
        tasks = json.loads(storage.read_text(export_uri))
    if not isinstance(tasks, list):
        raise ValueError(f"{export_uri} is not a Label Studio JSON export (a list of tasks): export it as JSON")
    return tasks


def export_class_names(
    export_uri: str, label_config: str | None = None, tasks: list[dict[str, Any]] | None = None
) -> list[str]:
    """An export's classes: its labelling config's brush labels (``label_config``, else ``label_config.xml``
    beside the export), else the brush labels its annotations use, in order of first appearance."""
    beside = storage.join(posixpath.dirname(export_uri.rstrip("/")), LABEL_CONFIG_FILE)
    if label_config is None and storage.exists(beside):
        label_config = storage.read_text(beside)
    if label_config:
        return brush_label_names(label_config)
    return _names_in_order(tasks if tasks is not None else _read_tasks(export_uri))


def _names_in_order(tasks: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for task in tasks:
        annotation = chosen_annotation(task) or {}
        for result in annotation.get("result") or []:
            for name in (result.get("value") or {}).get("brushlabels") or []:
                names.setdefault(name)
    return list(names)
