"""cloudsend-prefect: run batches of scripts on local, SSH and EC2 hosts as a Prefect 3 flow."""

from cloudsend_prefect.block import CloudSendCluster
from cloudsend_prefect.config import BatchConfig, Environment, InstanceType, Job
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.resolve import load_config

__all__ = ["BatchConfig", "CloudSendCluster", "ConfigError", "Environment", "InstanceType", "Job", "load_config"]
