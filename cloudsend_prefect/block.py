"""The ``CloudSend Cluster`` block: instance types and environments saved in Prefect, edited in its UI.

Jobs are not part of it: they are flow parameters, so one saved cluster serves many batches.
Register the type with ``prefect block register -m cloudsend_prefect``.
"""

from __future__ import annotations

from pathlib import Path

from prefect.blocks.core import Block

from cloudsend_prefect.config import BatchConfig, ClusterSettings, Job
from cloudsend_prefect.loading import parse_config


class CloudSendCluster(Block, ClusterSettings):
    """Where cloudsend runs jobs (instance types) and what they run in (environments)."""

    _block_type_name = "CloudSend Cluster"
    _block_type_slug = "cloudsend-cluster"
    _description = "Instance types and environments that the cloudsend flow runs batches of jobs on."
    _documentation_url = "https://github.com/cloudsend/cloudsend-prefect#the-cluster-block"  # type: ignore[assignment]

    def to_config(self, jobs: list[Job], base_dir: Path, *, source: str = "") -> BatchConfig:
        """A validated batch: this cluster plus the jobs (their relative paths resolved against ``base_dir``)."""
        data = self.model_dump(include=set(ClusterSettings.model_fields), exclude_unset=True)
        data["instances"] = [i.model_dump(exclude_unset=True) for i in self.instances]
        data["environments"] = [e.model_dump(exclude_unset=True) for e in self.environments]
        data["jobs"] = [j.model_dump(exclude_unset=True) for j in jobs]
        source = source or f"block cloudsend-cluster/{self._block_document_name}"
        return parse_config(data, source=source, base_dir=base_dir)

    @classmethod
    def from_config(cls, config: BatchConfig) -> CloudSendCluster:
        return cls(**{name: getattr(config, name) for name in ClusterSettings.model_fields})
