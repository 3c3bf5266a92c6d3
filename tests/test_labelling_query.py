"""jobs.query over a real labelling output on S3: SQL answers checked against the decoded masks, and exports."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from labelling_samples import encode_image, label_on_s3, noise_array
from PIL import Image

from jobs import query as query_cli
from pipelines.labelling import open_labels, query_labels
from pipelines.masks import decode_mask_png

CLASSES = ["cat", "dog", "sky"]


@pytest.fixture(scope="module")
def labelled(ray_cluster, s3_endpoint, tiny_checkpoint):
    images = {
        f"q{i}.png": encode_image(Image.fromarray(noise_array(36 + 8 * i, 52, 3, 40 + i)), "PNG") for i in range(5)
    }
    images["broken.jpg"] = b"not a jpeg"
    output = label_on_s3(s3_endpoint, f"query-{os.getpid() % 10000}", images, CLASSES, tiny_checkpoint)
    rows = open_labels(output).to_table().to_pylist()
    masks = {r["image_id"]: decode_mask_png(r["mask_png"]) for r in rows if r["error"] is None}
    return output, masks


def test_class_frequency_query_matches_the_masks(labelled):
    output, masks = labelled
    sql = """
        SELECT s.class_name AS class_name, count(*) AS images, sum(s.pixel_count) AS pixels
        FROM labels, unnest(class_stats) AS t(s) GROUP BY 1 ORDER BY 1
    """
    answer = {r["class_name"]: (r["images"], r["pixels"]) for r in query_labels(output, sql).to_pylist()}
    expected = {}
    for class_id, name in enumerate(CLASSES):
        present = [m for m in masks.values() if (m == class_id).any()]
        if present:
            expected[name] = (len(present), int(sum((m == class_id).sum() for m in present)))
    assert answer == expected


def test_images_where_a_class_covers_more_than_a_share_match_the_masks(labelled, capsys):
    output, masks = labelled
    fractions = sorted(float((m == 2).mean()) for m in masks.values())
    share = (fractions[1] + fractions[2]) / 2  # between two images: some qualify, some don't
    expected = sorted(image_id for image_id, m in masks.items() if (m == 2).mean() > share)
    assert 0 < len(expected) < len(masks)
    sql = (
        "SELECT image_id FROM labels, unnest(class_stats) AS t(s) "
        f"WHERE s.class_name = 'sky' AND s.fraction > {share} ORDER BY image_id"
    )
    assert query_cli.main(["--output", output, "--sql", sql, "--format", "json"]) == 0
    printed = [json.loads(line)["image_id"] for line in capsys.readouterr().out.splitlines()]
    assert printed == expected


def test_error_rows_are_queryable(labelled):
    output, _ = labelled
    rows = query_labels(output, "SELECT source_uri, error FROM labels WHERE error IS NOT NULL").to_pylist()
    assert len(rows) == 1 and rows[0]["source_uri"].endswith("broken.jpg")


def test_png_export_round_trips(labelled, tmp_path):
    output, masks = labelled
    assert query_cli.main(["--output", output, "--export", "png", "--to", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["classes"] == CLASSES and index["unlabelled_value"] == 255
    assert sorted(i["image_id"] for i in index["images"]) == sorted(masks)
    for image_id, mask in masks.items():
        exported = np.asarray(Image.open(tmp_path / f"{image_id}.png"))
        assert np.array_equal(exported, mask)
        assert np.array_equal(decode_mask_png((tmp_path / f"{image_id}.png").read_bytes()), mask)


def test_export_where_selects_images(labelled, tmp_path):
    output, masks = labelled
    some = sorted(masks)[:2]
    where = f"image_id IN ('{some[0]}', '{some[1]}')"
    assert query_cli.main(["--output", output, "--export", "png", "--to", str(tmp_path), "--where", where]) == 0
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == some


def test_bad_sql_is_a_one_line_error(labelled, capsys):
    output, _ = labelled
    assert query_cli.main(["--output", output, "--sql", "SELEC nothing"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_review_rows_as_csv_jsonl_and_a_table_keep_ids_and_uris_whole(tmp_path, capsys):
    import pyarrow.csv as pacsv
    from feedback_samples import write_run

    deep = "a folder name long enough that any terminal table would have wrapped it/" * 2
    names = {f"{deep}image {i}, with a comma.png": 0.1 * i for i in range(4)}
    images = {name: (noise_array(6, 8, 3, i), np.full((6, 8), i % 2, np.uint8)) for i, name in enumerate(names)}
    run = write_run(tmp_path, images, ["cat", "dog"], margins=names)
    expected = open_labels(run).to_table(columns=["image_id", "source_uri", "mean_margin"]).sort_by("mean_margin")

    assert query_cli.main(["--output", run, "--review", "4", "--format", "csv", "--to", str(tmp_path / "r.csv")]) == 0
    from_csv = pacsv.read_csv(tmp_path / "r.csv").select(["image_id", "source_uri", "mean_margin"])
    assert from_csv.to_pylist() == expected.to_pylist()

    assert query_cli.main(["--output", run, "--review", "4", "--format", "jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [{k: json.loads(line)[k] for k in ("image_id", "source_uri")} for line in lines] == (
        expected.select(["image_id", "source_uri"]).to_pylist()
    )

    assert query_cli.main(["--output", run, "--review", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    for row in expected.to_pylist():  # one line per image, its id and URI whole on it
        assert sum(row["image_id"] in line and row["source_uri"] in line for line in table) == 1
    assert table[-1] == "(4 rows)"
