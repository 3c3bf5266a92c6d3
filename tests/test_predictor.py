"""The sliding-window Predictor: the paper's protocol, output contract, vocabulary cache, device choice."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

import catseg

CLASSES = ["sky", "tree", "car", "road"]


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return catseg.Predictor(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(150, 230, 3), dtype=np.uint8)


def _reference_sliding_window(model, image: torch.Tensor, classes) -> torch.Tensor:
    """The reference's protocol, written with Unfold/Fold as its evaluation code does."""
    kernel, stride, out_res = 384, 256, [640, 640]
    unfold = torch.nn.Unfold(kernel_size=kernel, stride=stride)
    fold = torch.nn.Fold(out_res, kernel_size=kernel, stride=stride)
    resized = F.interpolate(image[None], size=out_res, mode="bilinear", align_corners=False).squeeze(0)
    crops = rearrange(unfold(resized), "(C H W) L -> L C H W", C=3, H=kernel)
    whole = F.interpolate(image[None], size=(kernel, kernel), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = model(torch.cat([crops, whole]), classes)
    probs = F.interpolate(logits, size=kernel, mode="bilinear", align_corners=False).sigmoid()
    global_probs = F.interpolate(probs[-1:], size=out_res, mode="bilinear", align_corners=False)
    local = fold(probs[:-1].flatten(1).T) / fold(unfold(torch.ones([1, *out_res])))
    final = (local + global_probs) / 2
    return F.interpolate(final, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]


def test_predict_follows_the_papers_sliding_window_protocol(predictor, tiny_model, photo):
    probs = predictor.predict(photo, CLASSES)
    expected = _reference_sliding_window(tiny_model, torch.from_numpy(photo).permute(2, 0, 1).float(), CLASSES)
    assert probs.shape == (len(CLASSES), 150, 230) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    assert probs.min() >= 0 and probs.max() <= 1


def test_batched_prediction_equals_one_by_one(predictor, photo):
    other = np.ascontiguousarray(photo[::-1, :, ::-1])[:100]
    batch = predictor.predict_batch([photo, other], CLASSES)
    np.testing.assert_allclose(batch[0], predictor.predict(photo, CLASSES), atol=1e-5)
    np.testing.assert_allclose(batch[1], predictor.predict(other, CLASSES), atol=1e-5)
    assert batch[1].shape == (len(CLASSES), 100, 230)


def test_predict_labels_is_the_argmax_of_predict(tiny_model, photo):
    predictor = catseg.Predictor(tiny_model, device="cpu", class_chunk=3)  # chunks of 3 + 1 classes
    probs = predictor.predict(photo, CLASSES)
    labels, confidence = predictor.predict_labels(photo, CLASSES)
    assert labels.shape == confidence.shape == (150, 230)
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))
    np.testing.assert_allclose(confidence, probs.max(axis=0), atol=1e-6)


def test_accepts_pil_images_and_channel_first_tensors(predictor, photo):
    expected = predictor.predict(photo, CLASSES)
    np.testing.assert_allclose(predictor.predict(Image.fromarray(photo), CLASSES), expected, atol=1e-6)
    tensor = torch.from_numpy(photo).permute(2, 0, 1).float()
    np.testing.assert_allclose(predictor.predict(tensor, CLASSES), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (np.zeros((10, 10), dtype=np.uint8), ValueError),
        (np.zeros((10, 10, 4), dtype=np.uint8), ValueError),
        (np.zeros((10, 10, 3), dtype=np.int64), TypeError),
        ("image.jpg", TypeError),
    ],
)
def test_bad_images_are_refused(predictor, image, error):
    with pytest.raises(error, match="image"):
        predictor.predict(image, CLASSES)


def test_vocabulary_embeddings_are_cached_and_recomputed_on_change(tiny_model):
    predictor = catseg.Predictor(tiny_model, device="cpu")
    first = predictor.embed_classes(CLASSES)
    assert predictor.embed_classes(list(CLASSES)) is first  # same vocabulary: cached
    other = predictor.embed_classes(["sky", "tree"])
    assert other.shape[0] == 2  # new vocabulary: recomputed, not the stale cache
    assert predictor.embed_classes(CLASSES) is first


def test_cache_is_invalidated_when_the_text_encoder_changes():
    model = catseg.build_model("tiny")
    predictor = catseg.Predictor(model, device="cpu")
    before = predictor.embed_classes(CLASSES)
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        model.backbone.clip.transformer.resblocks[0].attn.v_proj_weight.mul_(1.5)
    after = predictor.embed_classes(CLASSES)
    assert after is not before
    assert not torch.allclose(after, before)


def test_device_defaults_to_cuda_only_when_present(tiny_model):
    predictor = catseg.Predictor(copy.deepcopy(tiny_model))  # the Predictor moves its model: not the shared one
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert predictor.device.type == expected
    assert next(predictor.model.parameters()).device.type == expected


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_stays_close_to_float32(predictor, tiny_model, photo, precision):
    fast = catseg.Predictor(tiny_model, device="cpu", precision=precision)
    exact, approximate = predictor.predict(photo, CLASSES), fast.predict(photo, CLASSES)
    assert approximate.dtype == np.float32 and approximate.shape == exact.shape
    difference = np.abs(approximate - exact)
    assert 0 < difference.max() < 0.1, difference.max()  # it did run in reduced precision, and stayed close
    agreement = (approximate.argmax(0) == exact.argmax(0)).mean()
    assert agreement > 0.9, agreement


def test_unknown_precision_is_refused(tiny_model):
    with pytest.raises(ValueError, match="bfloat16"):
        catseg.Predictor(tiny_model, device="cpu", precision="int8")


# -- large images: resize and full-size labels in bands, equal to one call -----------------------------------------


def _unbanded(monkeypatch, compute):
    with monkeypatch.context() as patch:
        patch.setattr(catseg.predictor, "BANDED_ABOVE_PIXELS", 10**12)
        return compute()


@pytest.mark.parametrize(("height", "width"), [(150, 230), (301, 97), (97, 1003), (613, 451)])
def test_banded_resize_equals_one_interpolation(monkeypatch, height, width):
    rng = np.random.default_rng(height)
    image = torch.from_numpy(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).permute(2, 0, 1)
    expected = F.interpolate(image.float()[None], size=(640, 640), mode="bilinear", align_corners=False)[0]
    monkeypatch.setattr(catseg.predictor, "BANDED_ABOVE_PIXELS", 5000)
    got = catseg.predictor.resize_bilinear(image, (640, 640), band_floats=3 * width * 7)  # 7 rows per band
    assert got.dtype == torch.float32 and got.shape == (3, 640, 640)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("height", "width", "classes"), [(150, 230, 4), (301, 97, 37), (97, 1003, 5), (613, 451, 6), (257, 183, 300)]
)
def test_banded_labels_equal_the_unbanded_computation(monkeypatch, tiny_model, height, width, classes):
    """Bit for bit: probabilities, labels and their ties; T = 300 needs 16-bit labels."""
    rng = np.random.default_rng(width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    names = [f"thing {i}" for i in range(classes)]
    predictor = catseg.Predictor(tiny_model, device="cpu", class_chunk=16)
    probs = _unbanded(monkeypatch, lambda: predictor.predict(image, names))  # one interpolation per class chunk
    monkeypatch.setattr(catseg.predictor, "BANDED_ABOVE_PIXELS", 5000)
    monkeypatch.setattr(catseg.predictor, "BAND_FLOATS", 3 * height * 5)  # a few classes and columns per band
    [(banded_labels, banded_confidence, runner_up)] = predictor.predict_labels_batch([image], names, runner_up=True)
    assert banded_labels.dtype == (np.uint16 if classes > 256 else np.uint8)
    assert banded_labels.shape == banded_confidence.shape == (height, width)
    np.testing.assert_array_equal(banded_labels, probs.argmax(axis=0))
    np.testing.assert_array_equal(banded_confidence, probs.max(axis=0))
    np.testing.assert_array_equal(runner_up, np.sort(probs, axis=0)[-2])
    if classes > 100:
        return  # the unbanded runner-up: the small vocabularies check it (each run here is a model forward)
    unbanded = _unbanded(monkeypatch, lambda: predictor.predict_labels_batch([image], names, runner_up=True)[0])
    for got, expected in zip(unbanded, (banded_labels, banded_confidence, runner_up), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_label_maps_are_the_smallest_unsigned_type():
    assert [catseg.predictor.label_dtype(n) for n in (1, 256, 257, 65536, 65537)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.uint32
    ]  # fmt: skip


MEMORY_SCRIPT = """
import resource, sys, numpy as np, torch, catseg
torch.manual_seed(0)
predictor = catseg.Predictor(catseg.build_model("tiny").eval(), device="cpu")
names = [f"class {i}" for i in range(150)]
predictor.embed_classes(names)  # loaded, vocabulary embedded
image = np.full((4000, 6000, 3), 7, dtype=np.uint8)
image[::7, ::5] = 200
def rss_mib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss_mib("VmRSS")
# the first forward counts: the Predictor keeps freed memory for the next one (catseg.allocator), so measuring
# after a warm-up would leave the forward's working memory out of the figure
predictor.predict_labels(np.zeros((64, 64, 3), np.uint8), names)
labels, confidence = predictor.predict_labels(image, names)
assert labels.shape == (4000, 6000) and labels.dtype == np.uint8, labels.dtype
print(rss_mib("VmHWM") - before)
"""


def test_a_24_megapixel_image_at_150_classes_stays_under_a_memory_bound():
    """Above the loaded model and the decoded image: at most 1 GiB (7.1 GB when each class chunk was upsampled
    to the whole image at once)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_above_mib = float(result.stdout.strip().splitlines()[-1])
    assert peak_above_mib < 1024, f"{peak_above_mib:.0f} MiB above the loaded model"


def test_streamed_labels_equal_the_held_computation(tiny_model, photo):
    names = [f"thing {i}" for i in range(40)]
    held = catseg.Predictor(tiny_model, device="cpu", class_chunk=16, stream_classes=False)
    streamed = catseg.Predictor(tiny_model, device="cpu", class_chunk=16, stream_classes=True)
    assert streamed.streams(40) and not held.streams(40)
    expected = held.predict_labels_batch([photo], names, runner_up=True)[0]
    got = streamed.predict_labels_batch([photo], names, runner_up=True)[0]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_untruncated_large_vocabularies_stream_by_default(tiny_model):
    predictor = catseg.Predictor(tiny_model, device="cpu", truncate=False)
    assert predictor.streams(catseg.predictor.STREAM_ABOVE_CLASSES + 1)
    assert not predictor.streams(catseg.predictor.STREAM_ABOVE_CLASSES)
    assert not catseg.Predictor(tiny_model, device="cpu").streams(1000)  # truncation bounds memory itself
