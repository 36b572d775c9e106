"""Sweeps: lists of jobs, one JSON per job, run here, in local processes or on a Ray cluster (``executors``),
from the published study (``sweeps``) or a spec file of your own (``spec``), and reports built from them."""

from .executors import JobsFailed, run_jobs, run_sweep
from .jobs import Job, load_records, run_job
from .report import write_report
from .spec import EstimateJob, load_spec
from .sweeps import SWEEPS

__all__ = ["EstimateJob", "Job", "JobsFailed", "SWEEPS", "load_records", "load_spec", "run_job", "run_jobs", "run_sweep",
           "write_report"]
