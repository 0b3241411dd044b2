"""Building and exporting jobs (NVFlare's job API names)."""

from flkit.job.config import JobConfig, load_job
from flkit.job.fed_job import FedAvgJob, FedJob
from flkit.runner.script_runner import ScriptRunner

__all__ = ["FedAvgJob", "FedJob", "JobConfig", "ScriptRunner", "load_job"]
