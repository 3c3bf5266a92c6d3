"""A static HTML preview of a labelling run: source images, colour overlays of the masks, class fractions.

    render_preview("s3://bucket/labels/run1", "./preview", n=50, where="width >= 512")

writes ``<dest>/index.html`` and ``<dest>/images/*.jpg`` (no scripts, no external assets: open it from disk or
serve the folder). Images come from each row's ``source_uri`` through fsspec, so s3:// sources work. The page has
a legend, per-image class fractions, a run-level class histogram (inline SVG) and the rows that failed with their
error text. Every piece of text from the data (class names, URIs, errors) is HTML-escaped.
"""

from __future__ import annotations

import colorsys
import html
import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipelines import storage
from pipelines.images import decode_image
from pipelines.label_output import LabelOutput
from pipelines.label_queries import REVIEW_ORDER, labels_connection
from pipelines.masks import UNLABELLED_8BIT, UNLABELLED_16BIT, decode_mask_png

IMAGES_DIR = "images"
MAX_IMAGE_SIDE = 384  # page images are thumbnails: originals may be many megapixels
OVERLAY_ALPHA = 0.55
HISTOGRAM_MAX_CLASSES = 40  # large vocabularies (ade847): the most frequent classes, then a "N more" note
UNLABELLED_COLOR = (128, 128, 128)
GOLDEN_RATIO_CONJUGATE = 0.618033988749895


# -- palette and overlay --------------------------------------------------------------------------------------
def class_color(class_id: int) -> tuple[int, int, int]:
    """A fixed colour per class id: hues spaced by the golden ratio (neighbouring ids differ clearly), and three
    saturation/value levels so that ids whose hues come close again stay apart."""
    hue = (class_id * GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation, value = ((0.75, 0.95), (0.55, 0.80), (0.90, 0.65))[class_id % 3]
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def colorize_mask(mask: np.ndarray, unlabelled: int) -> np.ndarray:
    """H x W class ids -> H x W x 4 RGBA; unlabelled pixels are fully transparent."""
    ids, inverse = np.unique(mask, return_inverse=True)  # only the ids present: 16-bit masks stay cheap
    lookup = np.array([(*class_color(int(i)), 0 if i == unlabelled else 255) for i in ids], dtype=np.uint8)
    return lookup[inverse.reshape(mask.shape)]


def overlay_mask(image: Image.Image, mask: np.ndarray, unlabelled: int, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image with the class colours blended in; the mask is resized (nearest) to the image when they differ."""
    rgb = image.convert("RGB")
    if mask.shape != (rgb.height, rgb.width):
        resized = Image.fromarray(mask.astype(np.int32), mode="I").resize(rgb.size, Image.Resampling.NEAREST)
        mask = np.asarray(resized)
    colours = colorize_mask(mask, unlabelled)
    weight = colours[..., 3:4].astype(np.float32) / 255.0 * alpha
    base = np.asarray(rgb, dtype=np.float32)
    blended = base * (1.0 - weight) + colours[..., :3].astype(np.float32) * weight
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")


def mask_as_image(mask: np.ndarray, unlabelled: int) -> Image.Image:
    """The colour mask alone (unlabelled grey), for rows whose source image can no longer be read."""
    colours = colorize_mask(mask, unlabelled)
    rgb = colours[..., :3].copy()
    rgb[colours[..., 3] == 0] = UNLABELLED_COLOR
    return Image.fromarray(rgb, mode="RGB")


# -- SVG histogram --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassTotal:
    class_id: int
    class_name: str
    images: int
    pixels: int


def histogram_svg(totals: list[ClassTotal], *, width: int = 720, max_classes: int = HISTOGRAM_MAX_CLASSES) -> str:
    """Horizontal bars, one per class: share of all labelled pixels of the run, with the number of images."""
    if not totals:
        return '<p class="empty">No labelled pixels in this run.</p>'
    shown = sorted(totals, key=lambda t: (-t.pixels, t.class_id))[:max_classes]
    all_pixels = sum(t.pixels for t in totals) or 1
    largest = max(t.pixels for t in shown) or 1
    row_height, label_width, value_width = 20, 200, 170
    bar_space = width - label_width - value_width
    height = row_height * len(shown) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="histogram" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="histogram-title">',
        '<title id="histogram-title">Share of labelled pixels per class over the run</title>',
    ]
    for row, total in enumerate(shown):
        y = 4 + row * row_height
        bar = max(1, round(bar_space * total.pixels / largest))
        name = html.escape(total.class_name)
        share = 100.0 * total.pixels / all_pixels
        parts.append(
            f'<g class="bar"><text x="{label_width - 6}" y="{y + 14}" text-anchor="end">{name}</text>'
            f'<rect x="{label_width}" y="{y + 2}" width="{bar}" height="{row_height - 4}" '
            f'fill="{hex_color(class_color(total.class_id))}"><title>{name}</title></rect>'
            f'<text x="{label_width + bar + 6}" y="{y + 14}">{share:.1f}% · {total.images} images</text></g>'
        )
    parts.append("</svg>")
    hidden = len(totals) - len(shown)
    note = f'<p class="note">{hidden} less frequent classes not shown.</p>' if hidden > 0 else ""
    return "".join(parts) + note


# -- page -----------------------------------------------------------------------------------------------------
@dataclass
class PreviewImage:
    image_id: str
    source_uri: str
    width: int | None
    height: int | None
    class_stats: list[dict[str, Any]]
    source_file: str | None = None
    overlay_file: str | None = None
    problem: str | None = None  # why the source could not be shown (the mask may still be)


@dataclass
class PreviewData:
    output_uri: str
    run_id: str | None
    model_id: str | None
    class_names: list[str]
    where: str | None
    labelled_total: int
    error_total: int
    images: list[PreviewImage] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    totals: list[ClassTotal] = field(default_factory=list)


def _safe_name(image_id: str) -> str:
    """File name for an image id (ids are hex hashes; anything else is replaced rather than trusted)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", image_id)[:80] or "image"


def _save_jpeg(image: Image.Image, uri: str) -> None:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=88)
    storage.write_bytes(uri, buffer.getvalue())


def _load_source(uri: str) -> Image.Image:
    """The source image as the labeller saw it (the labelling pipeline's own decoder)."""
    return Image.fromarray(decode_image(storage.read_bytes(uri)))


def _thumbnail_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_IMAGE_SIDE / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _write_images(row: dict[str, Any], unlabelled: int, dest_dir: str) -> PreviewImage:
    item = PreviewImage(row["image_id"], row["source_uri"], row["width"], row["height"], row["class_stats"] or [])
    name = _safe_name(row["image_id"])
    mask = decode_mask_png(row["mask_png"])
    try:
        source = _load_source(row["source_uri"])
    except Exception as err:  # moved, deleted or unreadable since labelling: show the mask alone
        item.problem = f"source image not readable: {type(err).__name__}: {err}"
        source = None
    size = _thumbnail_size(mask.shape[1], mask.shape[0])
    if source is not None:
        source = source.resize(size, Image.Resampling.LANCZOS)
        item.source_file = f"{IMAGES_DIR}/{name}.jpg"
        _save_jpeg(source, storage.join(dest_dir, item.source_file))
        overlay = overlay_mask(source, mask, unlabelled)
    else:
        overlay = mask_as_image(mask, unlabelled).resize(size, Image.Resampling.NEAREST)
    item.overlay_file = f"{IMAGES_DIR}/{name}-overlay.jpg"
    _save_jpeg(overlay, storage.join(dest_dir, item.overlay_file))
    return item


PREVIEW_ORDERS = ("sample", "uncertain")


def collect_preview(
    output_uri: str, dest_dir: str, n: int = 50, where: str | None = None, order: str = "sample"
) -> PreviewData:
    """Query the output, write the page's images under ``dest_dir/images`` and return what the page shows.

    ``order`` "sample": the first ``n`` labelled rows in ``image_id`` order (a hash of the URI: a stable
    pseudo-random sample); "uncertain": the ``n`` least certain first (the review queue, ``jobs.query --review``).
    ``where`` is a SQL condition on the table ``labels``, as for ``jobs.query --where``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if order not in PREVIEW_ORDERS:
        raise ValueError(f"order must be one of {', '.join(PREVIEW_ORDERS)}, got {order!r}")
    output = LabelOutput.existing(output_uri)
    manifest = output.read_manifest() or {}
    names = list(manifest.get("vocabulary", {}).get("names") or [])
    unlabelled = manifest.get("config", {}).get("unlabelled_value")
    if unlabelled is None:
        unlabelled = UNLABELLED_8BIT if len(names) <= UNLABELLED_8BIT else UNLABELLED_16BIT
    selection = f" AND ({where})" if where else ""
    with labels_connection(output) as connection:
        [(labelled_total, error_total)] = connection.sql(
            f"SELECT count(*) FILTER (error IS NULL), count(*) FILTER (error IS NOT NULL) FROM labels WHERE true"
            f"{selection}"
        ).fetchall()
        rows = connection.sql(
            "SELECT image_id, source_uri, width, height, mask_png, class_stats FROM labels "
            f"WHERE error IS NULL{selection} ORDER BY {'image_id' if order == 'sample' else REVIEW_ORDER} "
            f"LIMIT {int(n)}"
        ).to_arrow_table()
        errors = connection.sql(
            f"SELECT image_id, source_uri, error FROM labels WHERE error IS NOT NULL{selection} "
            f"ORDER BY source_uri LIMIT {int(n)}"
        ).to_arrow_table()
        totals = connection.sql(
            "SELECT s.class_id, s.class_name, count(*) AS images, sum(s.pixel_count) AS pixels "
            "FROM labels, unnest(class_stats) AS t(s) WHERE error IS NULL GROUP BY 1, 2"
        ).fetchall()
    data = PreviewData(
        output_uri=output_uri,
        run_id=manifest.get("run_id"),
        model_id=manifest.get("model", {}).get("id"),
        class_names=names,
        where=where,
        labelled_total=int(labelled_total or 0),
        error_total=int(error_total or 0),
        errors=errors.to_pylist(),
        totals=[ClassTotal(int(i), str(name), int(images), int(pixels)) for i, name, images, pixels in totals],
    )
    data.images = [_write_images(row, int(unlabelled), dest_dir) for row in rows.to_pylist()]
    return data


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
.meta { color: #555; } code { background: #f3f3f3; padding: 0 3px; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #0003; margin-right: 4px;
  vertical-align: -1px; }
.swatch.unlabelled { background: repeating-linear-gradient(45deg, #808080 0 3px, #fff 3px 6px); }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 6px 16px; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; max-width: 800px; }
.card img { margin-right: 4px; image-rendering: pixelated; width: 192px; height: auto; }
.card .uri { font-size: 12px; color: #555; word-break: break-all; }
.fractions { list-style: none; padding: 0; margin: 4px 0 0; font-size: 13px; }
.histogram text { font: 12px system-ui, sans-serif; fill: #222; }
table.errors { border-collapse: collapse; } table.errors td, table.errors th { border: 1px solid #ddd;
  padding: 3px 6px; text-align: left; vertical-align: top; }
.problem, .error { color: #a00; }
"""


def _swatch(class_id: int | None) -> str:
    if class_id is None:
        return '<span class="swatch unlabelled"></span>'
    return f'<span class="swatch" style="background:{hex_color(class_color(class_id))}"></span>'


def _fraction_list(stats: list[dict[str, Any]]) -> str:
    items = [
        f"<li>{_swatch(int(s['class_id']))}{html.escape(str(s['class_name']))}: {100.0 * s['fraction']:.1f}%</li>"
        for s in sorted(stats, key=lambda s: (-s["fraction"], s["class_id"]))
    ]
    unlabelled = 1.0 - sum(float(s["fraction"]) for s in stats)
    if unlabelled > 0.0005:  # pixels under the confidence threshold
        items.append(f"<li>{_swatch(None)}unlabelled: {100.0 * unlabelled:.1f}%</li>")
    return f'<ul class="fractions">{"".join(items)}</ul>'


def _image_card(item: PreviewImage) -> str:
    uri = html.escape(item.source_uri)
    parts = [f'<div class="card" id="img-{html.escape(item.image_id)}"><div class="uri">{uri}</div>']
    if item.source_file:
        parts.append(f'<img class="source" src="{html.escape(item.source_file)}" alt="source image {uri}">')
    if item.overlay_file:
        parts.append(f'<img class="overlay" src="{html.escape(item.overlay_file)}" alt="mask overlay {uri}">')
    if item.problem:
        parts.append(f'<div class="problem">{html.escape(item.problem)}</div>')
    size = f"{item.width} x {item.height} px" if item.width and item.height else ""
    parts.append(f'<div class="meta">{size}</div>{_fraction_list(item.class_stats)}</div>')
    return "".join(parts)


def render_html(data: PreviewData) -> str:
    """The page for :func:`collect_preview`'s result (pure: no I/O)."""
    present: dict[int, str] = {}
    has_unlabelled = False
    for item in data.images:
        for stat in item.class_stats:
            present.setdefault(int(stat["class_id"]), str(stat["class_name"]))
        has_unlabelled |= sum(float(s["fraction"]) for s in item.class_stats) < 0.9995
    legend = [
        f'<li data-class-id="{class_id}">{_swatch(class_id)}{html.escape(name)}</li>'
        for class_id, name in sorted(present.items())
    ]
    if has_unlabelled:
        legend.append(f"<li>{_swatch(None)}unlabelled (not coloured)</li>")
    selection = f" where <code>{html.escape(data.where)}</code>" if data.where else ""
    title = f"Labelling preview: {data.run_id or data.output_uri}"
    errors = "".join(
        f'<tr><td class="uri">{html.escape(str(row["source_uri"]))}</td>'
        f'<td class="error">{html.escape(str(row["error"]))}</td></tr>'
        for row in data.errors
    )
    error_section = (
        f'<table class="errors"><tr><th>source</th><th>error</th></tr>{errors}</table>'
        + (f"<p>{len(data.errors)} of {data.error_total} shown.</p>" if data.error_total > len(data.errors) else "")
        if data.errors
        else "<p>No errors.</p>"
    )
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Output <code>{html.escape(data.output_uri)}</code>; model '
        f"<code>{html.escape(data.model_id or 'unknown')}</code>; vocabulary of {len(data.class_names)} classes. "
        f"Showing {len(data.images)} of {data.labelled_total} labelled images{selection} "
        f"and {data.error_total} error rows.</p>",
        '<h2>Legend</h2><ul class="legend">' + "".join(legend) + "</ul>",
        "<h2>Classes over the whole run</h2>",
        histogram_svg(data.totals),
        "<h2>Images</h2>",
        '<div class="grid">' + "".join(_image_card(item) for item in data.images) + "</div>",
        f"<h2>Errors ({data.error_total})</h2>",
        error_section,
        "</body></html>",
    ]
    return "\n".join(body) + "\n"


def render_preview(output_uri: str, dest_dir: str, n: int = 50, where: str | None = None, order: str = "sample") -> str:
    """Write the preview of a labelling output to ``dest_dir`` (directory or fsspec URI); returns index.html's path."""
    data = collect_preview(output_uri, dest_dir, n=n, where=where, order=order)
    index = storage.join(dest_dir, "index.html")
    storage.write_text(index, render_html(data))
    return index
