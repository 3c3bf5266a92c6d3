"""Small image collections for the labelling tests: good files of every awkward kind, and broken ones."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def encode_image(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_array(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def good_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (encoded bytes, (height, width) as a viewer shows it)."""
    rotated = Image.fromarray(noise_array(40, 72, 3, 5))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 72 wide x 40 high, displayed rotated by 90 degrees: 40 wide x 72 high
    deep = (np.linspace(0, 65535, 30 * 60).reshape(30, 60)).astype(np.uint16)
    return {
        "rgb.jpg": (encode_image(Image.fromarray(noise_array(48, 64, 3, 1)), "JPEG", quality=90), (48, 64)),
        "photo.png": (encode_image(Image.fromarray(noise_array(70, 50, 3, 2)), "PNG"), (70, 50)),
        "alpha.png": (encode_image(Image.fromarray(noise_array(40, 44, 4, 3), mode="RGBA"), "PNG"), (40, 44)),
        "gray.png": (encode_image(Image.fromarray(noise_array(44, 56, 1, 4), mode="L"), "PNG"), (44, 56)),
        "deep16.png": (encode_image(Image.fromarray(deep), "PNG"), (30, 60)),
        "rotated.jpg": (encode_image(rotated, "JPEG", exif=exif), (72, 40)),
    }


def bad_images() -> dict[str, bytes]:
    """name -> bytes that must each become an error row."""
    jpeg = encode_image(Image.fromarray(noise_array(64, 64, 3, 6)), "JPEG", quality=95)
    png = encode_image(Image.fromarray(noise_array(64, 64, 3, 7)), "PNG")
    return {
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(8).integers(0, 256, 500, dtype=np.uint8)),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "empty.png": b"",
        "notes.jpg": b"these are meeting notes, not an image\n",
    }


def upload(client, bucket: str, prefix: str, files: dict[str, bytes]) -> list[str]:
    """Put ``files`` under s3://bucket/prefix/; returns their URIs."""
    uris = []
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        uris.append(f"s3://{bucket}/{prefix}/{name}")
    return uris


def label_on_s3(s3_endpoint: str, bucket: str, files: dict[str, bytes], classes: list[str], checkpoint: str) -> str:
    """Upload ``files`` to s3://bucket/in/ and label them into s3://bucket/out with the tiny model on the test
    cluster (batches of 3, a CPU actor of half a CPU); returns the output URI."""
    import boto3

    from pipelines.labelling.run import LabelConfig, run_labelling
    from pipelines.models import resolve_model
    from pipelines.vocabulary import load_vocabulary

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    upload(client, bucket, "in", files)
    config = LabelConfig(
        output_uri=f"s3://{bucket}/out",
        vocabulary=load_vocabulary(classes),
        model=resolve_model(checkpoint=checkpoint),
        input_uri=f"s3://{bucket}/in",
        batch_size=3,
        num_gpus_per_actor=0,
        cpus_per_actor=0.5,
    )
    run_labelling(config)
    return config.output_uri
