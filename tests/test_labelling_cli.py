"""jobs.label argument handling that needs no cluster: model names, vocabularies, clear one-line errors."""

from __future__ import annotations

import pytest

from jobs import label as label_cli
from pipelines.models import resolve_model


def test_released_model_name_offline_tells_the_user_to_pass_a_checkpoint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--checkpoint") as info:
        resolve_model("vit_b16")
    assert "\n" not in str(info.value) and "hamacojr/CAT-Seg-weights/model_base.pth" in str(info.value)


def test_model_without_released_weights_or_unknown_is_refused():
    with pytest.raises(ValueError, match="no released weights"):
        resolve_model("tiny")
    with pytest.raises(ValueError, match=r"unknown model 'vit_h14'.*vit_b16"):
        resolve_model("vit_h14")


def test_checkpoint_is_checked_before_any_work(tmp_path, tiny_checkpoint):
    assert resolve_model(checkpoint=tiny_checkpoint).model_id == f"tiny@{tiny_checkpoint}"
    with pytest.raises(FileNotFoundError, match="no CAT-Seg checkpoint"):
        resolve_model(checkpoint=str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "vit_b16", "--vocab", "a,b"], "--checkpoint"),
        (["--model", "tiny", "--vocab", "a,a"], "duplicate class name"),
        (["--model", "tiny", "--vocab-preset", "nope"], "unknown vocabulary preset"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code = label_cli.main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_precision_is_checked_and_changes_the_run_id_only_when_set(tmp_path, tiny_checkpoint):
    import catseg
    from pipelines.labelling.run import LabelConfig
    from pipelines.vocabulary import load_vocabulary

    assert set(catseg.PRECISIONS) == set(catseg.predictor.AUTOCAST_DTYPES)
    common = {
        "output_uri": str(tmp_path / "out"),
        "vocabulary": load_vocabulary("cat,dog"),
        "model": resolve_model(checkpoint=tiny_checkpoint),
        "input_uri": str(tmp_path),
    }
    default, explicit = LabelConfig(**common), LabelConfig(**common, precision="float32")
    half = LabelConfig(**common, precision="bfloat16")
    assert default.resolved_run_id() == explicit.resolved_run_id() != half.resolved_run_id()
    with pytest.raises(ValueError, match="precision must be one of"):
        LabelConfig(**common, precision="fp8")
