"""A multi-node Ray cluster on this machine for tests (``ray.cluster_utils.Cluster``): a head with 1 CPU and no GPU
(the pipelines' CPU tasks) and GPU worker nodes (logical GPUs: actors fall back to the CPU) added and removed at will,
each node with its own HF_HOME and TMPDIR. Start it after the S3 variables are set (the s3_endpoint fixture), so
every node's workers inherit them.
"""

from __future__ import annotations

from pathlib import Path


class LocalCluster:
    """A head (1 CPU, no GPU: the pipeline's CPU tasks) and GPU nodes added and removed at will."""

    def __init__(self, root: Path) -> None:
        from ray.cluster_utils import Cluster

        self.root = root
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": self._env("head")},
        )
        self.gpu_nodes: list = []
        self._count = 0

    def _env(self, name: str) -> dict[str, str]:
        node_dir = self.root / name
        (node_dir / "tmp").mkdir(parents=True, exist_ok=True)
        return {"HF_HOME": str(node_dir / "hf"), "TMPDIR": str(node_dir / "tmp")}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_gpu_node(self, gpus: int = 1, cpus: float = 1, env: dict[str, str] | None = None) -> None:
        """A worker node with ``gpus`` logical GPUs; ``env`` adds to its own HF_HOME and TMPDIR."""
        self._count += 1
        env_vars = {**self._env(f"gpu{self._count}"), **(env or {})}
        node = self.cluster.add_node(num_cpus=cpus, num_gpus=gpus, env_vars=env_vars)
        self.gpu_nodes.append(node)

    def remove_gpu_node(self, index: int = 0) -> None:
        """Kill the node's processes without a drain, as a lost machine."""
        node = self.gpu_nodes.pop(index)
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()
