"""cluster.yaml passes the checks `ray up` runs before it contacts the cloud."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_validation():
    config = prepare_config(_config())
    validate_config(config)
    assert config["head_node_type"] == "head"


def test_head_runs_no_work_and_workers_have_gpus_and_scale_from_zero():
    config = _config()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 for t in workers.values())
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers.values())


def test_image_is_a_gpu_ray_image_matching_the_pinned_ray():
    import ray

    image = _config()["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"
    constraints = (CLUSTER_YAML.parent / "constraints.txt").read_text().split()
    assert f"ray=={ray.__version__}" in constraints


def test_validation_would_catch_a_broken_config():
    import jsonschema
    import pytest

    config = prepare_config(_config())
    config["available_node_types"]["gpu_small"]["unknown_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_setup_commands_install_every_dependency_at_its_pinned_version():
    """What the image lacks is installed on every node: the package's dependencies other than Ray and what Ray
    itself brings, constrained to constraints.txt (a missing one, like pillow-heif once, breaks every job)."""
    import re
    import tomllib

    commands = " ".join(_config()["setup_commands"])
    assert "-c ~/catseg-ray/constraints.txt" in commands
    project = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    from_ray = {"ray", "numpy", "pyarrow", "fsspec"}
    installed = set(commands.lower().split())
    assert sorted(names - from_ray - installed) == []
