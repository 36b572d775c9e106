"""Reproduction of the published study: sweeps of jobs, one JSON per job, and reports built from them."""

from .jobs import Job, load_records, run_job, run_sweep
from .report import write_report
from .sweeps import SWEEPS

__all__ = ["Job", "SWEEPS", "load_records", "run_job", "run_sweep", "write_report"]
