"""Prefect tasks, one per pipeline stage (see `tasks.stages`), and the plan that keys them."""
