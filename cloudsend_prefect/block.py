"""The ``CloudSend Cluster`` block: instance types and environments saved in Prefect, edited in its UI.

Jobs are not part of it: they are flow parameters, so one saved cluster serves many batches.
Register the type with ``prefect block register -m cloudsend_prefect``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field

from cloudsend_prefect.config import BatchConfig, Environment, InstanceType, Job
from cloudsend_prefect.loading import parse_config


class CloudSendCluster(Block):
    """Where cloudsend runs jobs (instance types) and what they run in (environments)."""

    _block_type_name = "CloudSend Cluster"
    _block_type_slug = "cloudsend-cluster"
    _description = "Instance types and environments that the cloudsend flow runs batches of jobs on."
    _documentation_url = "https://github.com/cloudsend/cloudsend-prefect#the-cluster-block"  # type: ignore[assignment]

    project: str = Field("cloudsend", title="Project", description="Names, and tags, everything this cluster creates.")
    provider: Literal["local", "ssh", "aws"] = Field(
        "local", title="Provider", description="Default provider of the instance types: local, ssh or aws."
    )
    auto_stop: bool = Field(
        True, title="Auto stop", description="Stop instances cloudsend created once the batch is over."
    )
    poll_interval: float = Field(
        1.0, gt=0, title="Poll interval (s)", description="How often each host is asked for its jobs' states."
    )
    lost_after: float = Field(
        120,
        gt=0,
        title="Lost after (s)",
        description="A host that answers nothing for this long is lost; its unfinished jobs run again elsewhere.",
    )
    instances: list[InstanceType] = Field(
        default_factory=lambda: [InstanceType()],
        title="Instance types",
        description="Hosts to run on; each type can stand for several instances (`number`).",
    )
    environments: list[Environment] = Field(
        default_factory=list,
        title="Environments",
        description="Software the jobs run in, built once per host and reused while unchanged.",
    )

    def to_config(self, jobs: list[Job], base_dir: Path, *, source: str = "") -> BatchConfig:
        """A validated batch: this cluster plus the jobs (their relative paths resolved against ``base_dir``)."""
        data = self.model_dump(include={"project", "provider", "auto_stop", "poll_interval", "lost_after"})
        data["instances"] = [i.model_dump(exclude_unset=True) for i in self.instances]
        data["environments"] = [e.model_dump(exclude_unset=True) for e in self.environments]
        data["jobs"] = [j.model_dump(exclude_unset=True) for j in jobs]
        return parse_config(
            data, source=source or f"block cloudsend-cluster/{self._block_document_name}", base_dir=base_dir
        )

    @classmethod
    def from_config(cls, config: BatchConfig) -> CloudSendCluster:
        return cls(
            project=config.project,
            provider=config.provider,
            auto_stop=config.auto_stop,
            poll_interval=config.poll_interval,
            lost_after=config.lost_after,
            instances=config.instances,
            environments=config.environments,
        )
