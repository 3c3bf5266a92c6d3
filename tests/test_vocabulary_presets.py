"""Vocabularies for labelling runs: comma lists, files (local and S3), presets, and what gets refused."""

from __future__ import annotations

import json

import boto3
import pytest

from pipelines.vocabulary import list_presets, load_vocabulary, parse_vocabulary_text


@pytest.mark.parametrize(("preset", "size"), [("voc20", 20), ("pc59", 59), ("ade150", 150), ("cocostuff171", 171)])
def test_presets_hold_the_benchmark_vocabularies(preset, size):
    vocabulary = load_vocabulary(preset=preset)
    assert len(vocabulary) == size and vocabulary.source == f"preset:{preset}"
    assert preset in list_presets()


def test_preset_names_are_the_benchmark_class_names():
    assert load_vocabulary(preset="voc20").names[:3] == ("aeroplane", "bicycle", "bird")
    assert load_vocabulary(preset="ade150").names[-1] == "flag"
    assert "bed" in load_vocabulary(preset="ade150").names  # surrounding space in the source list is stripped
    assert load_vocabulary(preset="cocostuff171").names[80] == "banner"  # stuff classes follow the 80 things


def test_comma_list_is_split_and_stripped():
    vocabulary = load_vocabulary(" cat, dog ,sky")
    assert vocabulary.names == ("cat", "dog", "sky") and vocabulary.source == "list"


def test_text_file_allows_synonyms_comments_and_blank_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\nbuilding, edifice\n\nroad\n")
    assert load_vocabulary(file=str(path)).names == ("building, edifice", "road")


def test_json_files_as_list_or_object():
    assert parse_vocabulary_text(json.dumps(["a", "b"])) == ("a", "b")
    assert parse_vocabulary_text(json.dumps({"classes": ["x", "y"]})) == ("x", "y")


def test_vocabulary_file_on_s3(s3_endpoint, s3_bucket):
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=s3_bucket, Key="v.txt", Body=b"cat\ndog\n")
    vocabulary = load_vocabulary(file=f"s3://{s3_bucket}/v.txt")
    assert vocabulary.names == ("cat", "dog") and vocabulary.source == f"file:s3://{s3_bucket}/v.txt"


def test_vocab_id_is_stable_and_order_sensitive():
    assert load_vocabulary("a,b").vocab_id == load_vocabulary(["a", "b"]).vocab_id
    assert load_vocabulary("a,b").vocab_id != load_vocabulary("b,a").vocab_id


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("", "class name #0 is empty"),
        ("cat,,dog", "class name #1 is empty"),
        ("cat,dog,Cat", "duplicate class name"),
        ("x" * 201, "201 characters"),
        (",".join(f"c{i}" for i in range(65536)), "at most 65535"),
    ],
)
def test_bad_vocabularies_are_refused_with_a_clear_message(names, message):
    with pytest.raises(ValueError, match=message):
        load_vocabulary(names)


def test_empty_file_and_unknown_preset_are_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_vocabulary(file=str(path))
    with pytest.raises(ValueError, match="voc20"):
        load_vocabulary(preset="voc21")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vocabulary(file=str(tmp_path / "missing.txt"))


def test_exactly_one_source_is_required():
    with pytest.raises(ValueError, match="exactly one"):
        load_vocabulary("a", preset="voc20")
    with pytest.raises(ValueError, match="exactly one"):
        load_vocabulary()
