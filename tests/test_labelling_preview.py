"""The HTML preview of a labelling run: built from a real run (local Ray, moto S3, tiny model), checked as text
and in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import boto3
import numpy as np
import pytest
from labelling_samples import encode_image, noise_array, upload
from PIL import Image

from jobs import preview as preview_cli
from pipelines.labelling.preview import ClassTotal, class_color, colorize_mask, histogram_svg, render_preview
from pipelines.labelling.run import LabelConfig, run_labelling
from pipelines.models import resolve_model
from pipelines.vocabulary import load_vocabulary

# Class names are user input: markup in them must come out as text.
VOCAB = ["cat", "<b>dog</b>", "sky & sea"]
GOOD_SIZES = {"one.png": (40, 56), "two.jpg": (48, 64), "three.png": (56, 40)}
SCREENSHOT_FOR_LEAD = Path("/tmp/preview_screenshot.png")


@pytest.fixture(scope="module")
def labelled_run(ray_cluster, s3_endpoint, tiny_checkpoint):
    """Three small images and one broken file in a bucket, labelled once; yields the output URI."""
    bucket = f"preview-{os.getpid() % 10000}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    files = {
        name: encode_image(Image.fromarray(noise_array(h, w, 3, seed)), "PNG" if name.endswith(".png") else "JPEG")
        for seed, (name, (h, w)) in enumerate(GOOD_SIZES.items())
    }
    files["broken.jpg"] = b"not an image at all\n"
    upload(client, bucket, "images", files)
    config = LabelConfig(
        output_uri=f"s3://{bucket}/labels",
        vocabulary=load_vocabulary(",".join(VOCAB)),
        model=resolve_model(checkpoint=tiny_checkpoint),
        input_uri=f"s3://{bucket}/images/",
        batch_size=2,
        num_gpus_per_actor=0,
        cpus_per_actor=1,
    )
    summary = run_labelling(config)
    assert (summary.ok, summary.errors) == (len(GOOD_SIZES), 1)
    return {"output": config.output_uri, "bucket": bucket}


@pytest.fixture(scope="module")
def preview_page(labelled_run, tmp_path_factory) -> Path:
    destination = tmp_path_factory.mktemp("preview")
    index = render_preview(labelled_run["output"], str(destination), n=10)
    return Path(index)


def test_palette_is_deterministic_and_unlabelled_is_transparent():
    assert class_color(7) == class_color(7)
    assert len({class_color(i) for i in range(200)}) == 200
    mask = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    rgba = colorize_mask(mask, unlabelled=255)
    assert rgba[1, 0, 3] == 0 and rgba[0, 0, 3] == 255 and tuple(rgba[0, 1, :3]) == class_color(1)


def test_histogram_escapes_names_and_caps_the_number_of_bars():
    totals = [ClassTotal(i, f"<c{i}>", images=1, pixels=100 - i) for i in range(5)]
    svg = histogram_svg(totals, max_classes=3)
    assert svg.count("<rect") == 3 and "&lt;c0&gt;" in svg and "<c0>" not in svg
    assert "2 less frequent classes not shown" in svg


def test_page_shows_images_legend_histogram_and_errors(labelled_run, preview_page):
    page = preview_page.read_text(encoding="utf-8")
    sources = re.findall(r'<img class="source" src="([^"]+)"', page)
    overlays = re.findall(r'<img class="overlay" src="([^"]+)"', page)
    assert len(sources) == len(overlays) == len(GOOD_SIZES)
    for relative in sources + overlays:
        with Image.open(preview_page.parent / relative) as image:
            assert image.format == "JPEG" and min(image.size) >= 40  # thumbnails keep these small images whole
    for name in GOOD_SIZES:
        assert f"s3://{labelled_run['bucket']}/images/{name}" in page
    legend = re.search(r'<ul class="legend">(.*?)</ul>', page, re.S).group(1)
    assert "&lt;b&gt;dog&lt;/b&gt;" in page and "<b>dog</b>" not in page
    assert any(escaped in legend for escaped in ("cat", "&lt;b&gt;dog&lt;/b&gt;", "sky &amp; sea"))
    assert re.search(r'<svg [^>]*class="histogram"', page) and "<rect" in page
    errors = re.search(r'<table class="errors">(.*?)</table>', page, re.S).group(1)
    assert f"s3://{labelled_run['bucket']}/images/broken.jpg" in errors and 'class="error"' in errors


def test_cli_selects_with_where_and_reports_errors_in_one_line(labelled_run, tmp_path, capsys):
    code = preview_cli.main(
        ["--output", labelled_run["output"], "--to", str(tmp_path / "one"), "--where", "source_uri LIKE '%two.jpg'"]
    )
    out = capsys.readouterr().out
    assert code == 0 and str(tmp_path / "one" / "index.html") in out
    page = (tmp_path / "one" / "index.html").read_text(encoding="utf-8")
    assert page.count('<img class="overlay"') == 1 and "two.jpg" in page and "one.png" not in page

    code = preview_cli.main(["--output", labelled_run["output"], "--to", str(tmp_path / "x"), "--where", "nope >"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or next(
        (path for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(path)), None
    )


def test_page_renders_in_headless_chromium(preview_page, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); browser check not run")
    common = [
        browser,
        "--headless",
        "--no-sandbox",  # tests may run as root in containers, where the sandbox cannot start
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,900",
    ]
    url = preview_page.resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert len(re.findall(r"<img ", dom)) == 2 * len(GOOD_SIZES)
    for name in ("cat", "&lt;b&gt;dog&lt;/b&gt;", "sky &amp; sea"):
        assert name in dom  # each name is in the legend or the histogram, as text
    assert "<svg" in dom and "broken.jpg" in dom

    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 10  # a blank page has (almost) no variance
    shutil.copyfile(shot, SCREENSHOT_FOR_LEAD)  # for a human look at the page
