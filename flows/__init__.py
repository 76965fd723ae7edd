"""Prefect flows (pipeline, sweep), the `sds` command line and deployment serving.

Importing this package does not import Prefect: `flows.cli` sets Prefect's environment first.
"""
