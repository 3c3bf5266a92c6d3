"""Shared fixtures: a tiny model, a real S3 endpoint on loopback (moto server) and a real local Ray cluster."""

from __future__ import annotations

import logging
import os
import re
import socket

# Before anything imports open_clip / huggingface_hub / ray: no downloads, no telemetry, no token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; AWS_* variables point every client (boto3, s3fs, pyarrow) at it."""
    from moto.server import ThreadedMotoServer

    # one INFO line per S3 request would bury a failing test's own output
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV_VARIABLES}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


S3_ENV_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket per test; yields its name."""
    import boto3

    # bucket names allow only [a-z0-9-]: parametrized test names carry brackets and commas
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"test-{stem}-{os.getpid() % 1000}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture
def local_cluster(s3_endpoint, tmp_path):
    """A multi-node Ray cluster on this machine (tests/local_cluster.py), started after the S3 variables are set
    so that every node's workers inherit them."""
    from local_cluster import LocalCluster

    cluster = LocalCluster(tmp_path / "nodes")
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny architecture with random weights (fixed seed), in eval mode. Do not modify it in tests."""
    import catseg

    torch.manual_seed(0)
    model = catseg.build_model("tiny").eval()
    with torch.no_grad():  # zero-initialized padding parameters would hide bugs in the padding path
        for name, param in model.named_parameters():
            if "padding" in name:
                param.normal_()
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    """A local checkpoint directory of ``tiny_model`` written by catseg.save_model."""
    import catseg

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    catseg.save_model(tiny_model, str(path))
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A real local Ray cluster on 2 CPUs and 1 fake GPU, started after the S3 variables so workers inherit them."""
    import ray

    # One fake GPU: actors asking for num_gpus=1 get scheduled and must fall back to the CPU.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
