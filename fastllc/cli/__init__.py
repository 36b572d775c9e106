"""The ``fastllc`` command line: parse options, call the public API, print. No logic lives only here.

One module per command (``estimate.py`` is ``fastllc estimate``); what they share is in ``common.py``."""

from __future__ import annotations

import click

from . import calibrate, circuits, estimate, lm, reproduce, sweep, train


@click.group()
@click.version_option(package_name="fastllc")
def main():
    """fastllc: fast estimates of the local learning coefficient λ̂ with batched SGLD."""


for command in (train.train_command, estimate.estimate_command, calibrate.calibrate_command, circuits.circuits_command,
                reproduce.reproduce_command, reproduce.report_command, sweep.sweep_command, lm.lm_command):
    main.add_command(command)
