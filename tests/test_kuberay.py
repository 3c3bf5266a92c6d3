"""deploy/kuberay/*.rayjob.yaml are valid RayJobs for the pinned KubeRay CRD and run our jobs on our Ray image.

The schema is the v1 openAPIV3Schema of KubeRay v1.7.0's RayJob CRD (tests/data/kuberay/SOURCE says where it comes
from). What it cannot say (the image equals the pinned Ray, the entrypoint's flags exist, the GPUs asked for are
there, KubeRay's own admission checks) is checked here directly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = {
    "label": ROOT / "deploy/kuberay/label.rayjob.yaml",
    "finetune": ROOT / "deploy/kuberay/finetune.rayjob.yaml",
}
SCHEMA = ROOT / "tests/data/kuberay/rayjob-v1-openapi-schema.json"


def _manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load(MANIFESTS[name].read_text())


def _constraints() -> dict[str, str]:
    pins = (line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    return {canonicalize_name(name): version for name, version in pins}


def _closed(node: Any) -> Any:
    """The schema with every object that lists its properties closed to others.

    Kubernetes treats CRD schemas as structural: fields a schema does not list are pruned on write, and rejected
    under strict field validation (kubectl apply's default), unless the object sets
    x-kubernetes-preserve-unknown-fields. JSON Schema allows them unless additionalProperties is false, so a typo
    like `shutdownAfterJobFinish` would pass here while Kubernetes drops or refuses it. Maps (objects with
    additionalProperties, such as rayStartParams or resource limits) and objects without properties (metadata,
    validated by the API server as ObjectMeta) stay open.
    """
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: _closed(value) for key, value in node.items()}
    preserved = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserved:
        closed["additionalProperties"] = False
    return closed


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


@cache
def _validator() -> jsonschema.Draft4Validator:
    # CRD schemas are OpenAPI v3.0 schemas, a JSON Schema draft-4 dialect; the x-kubernetes-* keywords (list and map
    # types, int-or-string, CEL rules) are ignored here. None of the CEL rules concerns fields these manifests set.
    schema = _closed(_schema())
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _errors(manifest: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(manifest)]


def _pod_templates(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = manifest["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _cluster_gpus(manifest: dict[str, Any]) -> int:
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return sum(g["replicas"] * sum(_gpus(c) for c in g["template"]["spec"]["containers"]) for g in groups)


def _parse_entrypoint(entrypoint: str, job: str) -> Any:
    """The entrypoint's arguments as the job's own parser reads them, refusing abbreviations: argparse would
    otherwise take an old flag name for an abbreviation of a renamed, longer one."""
    argv = shlex.split(entrypoint)  # KubeRay passes the entrypoint to a shell after `ray job submit --`
    assert argv[:3] == ["python", "-m", f"jobs.{job}"], f"entrypoint runs {argv[:3]}, not python -m jobs.{job}"
    if job == "label":
        from jobs.label import parse_args
    else:
        from jobs.finetune import parse_args
    original = argparse.ArgumentParser.parse_args

    def exact(parser: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        parser.allow_abbrev = False
        return original(parser, args, namespace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", exact)
        try:
            return parse_args(argv[3:])
        except SystemExit as exit_:  # argparse has printed the reason to stderr
            raise AssertionError(f"python -m jobs.{job} refuses the entrypoint's arguments: {argv[3:]}") from exit_


# -- the schema -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_a_valid_rayjob_of_the_pinned_crd(name: str) -> None:
    manifest = _manifest(name)
    # The CRD's schema leaves apiVersion and kind to the API server: they pick the schema.
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    assert _errors(manifest) == []


WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "shutdownAfterJobFinish"), True),  # misspelled field
        ((*WORKER, "template", "spec", "containers", 0, "resource"), {"limits": {"nvidia.com/gpu": "1"}}),  # misspelled
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # the CRD wants a string
        ((*WORKER, "replicas"), "4"),  # the CRD wants an integer
    ],
)
def test_validation_refuses_a_broken_manifest(path: tuple[str | int, ...], value: Any) -> None:
    manifest = copy.deepcopy(_manifest("label"))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    misspelled = path[-1] not in parent
    parent[path[-1]] = value
    assert _errors(manifest)
    if misspelled:  # what _closed is for: plain JSON Schema lets an unknown field through
        assert not list(jsonschema.Draft4Validator(_schema()).iter_errors(manifest))


def test_schema_file_is_the_pinned_release() -> None:
    source = (SCHEMA.parent / "SOURCE").read_text()
    assert "KubeRay v1.7.0" in source and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in source
    spec = _schema()["properties"]["spec"]["properties"]
    assert {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "rayClusterSpec"} <= spec.keys()


# -- what the schema cannot say ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_container_runs_the_pinned_ray_image_of_cluster_yaml(name: str) -> None:
    import ray

    image = f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert _constraints()["ray"] == ray.__version__
    assert yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"] == image
    manifest = _manifest(name)
    assert manifest["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    for group, template in _pod_templates(manifest):
        assert [c["image"] for c in template["spec"]["containers"]] == [image], group


def test_label_entrypoint_is_jobs_label_with_flags_it_accepts() -> None:
    from pipelines.labelling.run import LabelConfig
    from pipelines.vocabulary import load_vocabulary

    manifest = _manifest("label")
    args = _parse_entrypoint(manifest["spec"]["entrypoint"], "label")
    assert args.output_uri.startswith("s3://") and (args.input_uri or args.manifest_uri).startswith("s3://")
    # LabelConfig's own checks, as jobs.label runs them; the model (and a vocabulary file) come from storage at run
    # time, so only a preset or a list is resolved here.
    vocabulary = None if args.vocab_file else load_vocabulary(args.vocab, preset=args.vocab_preset)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(LabelConfig) if hasattr(args, f.name)}
    LabelConfig(**{**options, "vocabulary": vocabulary, "model": None})
    # Explicit GPUs per actor (a fresh cluster may report no GPUs yet) and no more actors than the workers hold.
    assert args.num_gpus_per_actor == 1
    assert 0 < args.max_actors * args.num_gpus_per_actor <= _cluster_gpus(manifest)


def test_finetune_entrypoint_is_jobs_finetune_with_flags_it_accepts() -> None:
    manifest = _manifest("finetune")
    config = _parse_entrypoint(manifest["spec"]["entrypoint"], "finetune")
    config.validate()
    assert config.storage.startswith("s3://") and config.data.startswith("s3://")  # every pod must reach them
    assert config.use_gpu and 0 < config.num_workers <= _cluster_gpus(manifest)  # one GPU per training worker


def test_a_renamed_or_abbreviated_flag_fails_the_entrypoint_check() -> None:
    entrypoint = _manifest("label")["spec"]["entrypoint"]
    with pytest.raises(AssertionError, match="refuses"):
        _parse_entrypoint(entrypoint.replace("--max-actors", "--max-actor"), "label")
    with pytest.raises(AssertionError, match="refuses"):
        _parse_entrypoint(entrypoint.replace("--max-actors", "--actors"), "label")


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpu_workers_request_nvidia_gpus_and_the_head_runs_no_work(name: str) -> None:
    manifest = _manifest(name)
    cluster = manifest["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    # Like cluster.yaml's head (resources {"CPU": 0}): it schedules, serves the job API and the driver, no tasks.
    assert yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["head"]["resources"] == {
        "CPU": 0
    }
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(_gpus(c) == 0 for c in head["template"]["spec"]["containers"])
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert _gpus(container) >= 1, group["groupName"]
        # Kubernetes requires requests == limits for extended resources such as GPUs.
        assert (
            resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
            == resources["limits"]["nvidia.com/gpu"]
        )
        # Ray takes num-gpus from the limits; a value here would override them.
        assert "num-gpus" not in group["rayStartParams"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_cluster_is_deleted_after_the_job(name: str) -> None:
    spec = _manifest(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "clusterSelector" not in spec and "deletionStrategy" not in spec  # a cluster of its own, deleted whole


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_kuberays_admission_checks(name: str) -> None:
    """The checks of ray-operator/controllers/ray/utils/validation.go (v1.7.0) that concern these manifests."""
    manifest = _manifest(name)
    job_name = manifest["metadata"]["name"]
    # ValidateRayJobMetadata: a DNS-1035 label of at most 47 characters (the cluster's name adds a suffix).
    assert len(job_name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job_name)
    cluster = manifest["spec"]["rayClusterSpec"]
    assert not cluster.get("enableInTreeAutoscaling")
    for group in cluster["workerGroupSpecs"]:
        # Without autoscaling both bounds must be set; replicas within them is what the operator then runs.
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    ray_start_resources = {"num-cpus", "num-gpus", "memory", "resources"}
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert group["template"]["spec"]["containers"]
        # Resources go in rayStartParams or in the group's resources field, never both.
        assert not (ray_start_resources & group["rayStartParams"].keys() and group.get("resources"))


def _ray_requirements() -> set[str]:
    """What ray[data,train,default] requires, so what the Ray image already holds."""
    extras = ("data", "train", "default")
    names = set()
    for line in importlib.metadata.requires("ray") or []:
        requirement = Requirement(line)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras):
            names.add(canonicalize_name(requirement.name))
    return names


@pytest.mark.parametrize("name", MANIFESTS)
def test_runtime_env_ships_the_repository_and_the_pinned_dependencies(name: str) -> None:
    runtime_env = yaml.safe_load(_manifest(name)["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"working_dir", "pip"}
    # A remote working_dir must be a zip Ray can fetch itself.
    assert re.fullmatch(r"(https|s3|gs)://\S+\.zip", runtime_env["working_dir"])
    pinned = {}
    for line in runtime_env["pip"]:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", line
        pinned[canonicalize_name(requirement.name)] = specifier.version
    constraints = _constraints()
    assert pinned == {package: constraints[package] for package in pinned}  # the versions our tests run
    dependencies = {
        canonicalize_name(Requirement(d).name) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())[
            "project"]["dependencies"]
    }  # fmt: skip
    assert "ray" not in pinned  # the image's Ray: client and cluster must match
    # Every dependency of the package is installed here, or comes with the image's Ray.
    assert dependencies - {"ray"} - _ray_requirements() == pinned.keys()
