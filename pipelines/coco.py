"""COCO JSON annotations as reviewed images (:mod:`pipelines.annotations`): polygons, uncompressed and compressed RLE
decoded by pycocotools, category names as classes, crowd regions (``iscrowd: 1``) ignored. Our own ``coco`` export
(``jobs.query --export coco``) reads back to the labels it was written from.

An image's ``file_name`` is its URI when absolute (our export writes the source URI); a relative name is read
under ``image_root``, by default the folder holding the JSON file.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.annotations import ReviewedSet, add_readable, label_from_layers
from pipelines.pairs import IGNORE_INDEX, check_label_classes


def _read_json(uri: str) -> dict[str, Any]:
    with storage.access_errors("read", uri):
        data = json.loads(storage.read_text(uri))
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"{uri} is not a COCO annotations file (it needs images, annotations and categories)")
    return data


def coco_class_names(uri: str) -> list[str]:
    """The category names of a COCO file, in category id order."""
    return [str(c["name"]) for c in sorted(_read_json(uri)["categories"], key=lambda c: c["id"])]


def read_coco(uri: str, *, classes: Sequence[str] | None = None, image_root: str | None = None) -> ReviewedSet:
    """A COCO annotations file as reviewed images on ``classes`` (default: its categories in id order). Images
    without annotations are left out (nothing was said about them); so are images that cannot be read."""
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise ImportError("reading COCO annotations needs pycocotools: pip install 'catseg-ray[export]'") from err
    data = _read_json(uri)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in categories]
    reviewed = ReviewedSet(uri, check_label_classes(list(classes) if classes is not None else names, uri))
    ids = {name: i for i, name in enumerate(reviewed.class_names)}
    class_of = {c["id"]: ids.get(str(c["name"])) for c in categories}
    root = image_root or posixpath.dirname(uri.rstrip("/"))
    candidates = []
    for image in data["images"]:
        key = f"image {image.get('id')}"
        annotations = coco.imgToAnns.get(image.get("id"), [])
        if not annotations:
            reviewed.skip(key, "no annotations")
            continue
        try:
            label = _image_label(coco, image, annotations, class_of, reviewed)
            image_uri = _image_uri(str(image.get("file_name") or ""), root)
        except Exception as err:  # a broken annotation costs its own image
            reviewed.skip(key, f"{type(err).__name__}: {err}")
            continue
        candidates.append((key, image_uri, label))
    add_readable(reviewed, candidates)
    return reviewed


def _image_label(
    coco: Any, image: dict[str, Any], annotations: list[dict[str, Any]], class_of: dict[int, int | None],
    reviewed: ReviewedSet,
) -> np.ndarray:  # fmt: skip
    shape = (int(image["height"]), int(image["width"]))
    layers, crowd = [], np.zeros(shape, dtype=bool)
    for annotation in annotations:
        mask = coco.annToMask(annotation).astype(bool)
        if annotation.get("iscrowd"):
            crowd |= mask
            continue
        class_id = class_of.get(annotation["category_id"])
        if class_id is None:
            reviewed.unknown_classes[str(annotation["category_id"])] += 1
        layers.append((class_id, mask))
    label = label_from_layers(shape, layers)
    label[crowd] = IGNORE_INDEX
    return label


def _image_uri(file_name: str, root: str) -> str:
    if not file_name:
        raise ValueError("an image without file_name")
    if "://" in file_name or file_name.startswith("/") or not root:
        return file_name
    return storage.join(root, file_name)
