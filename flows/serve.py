"""`sds serve`: the demo deployments, served from this process without a work pool.

They are defined here, in code, with `flow.to_deployment`; `deployments/prefect.yaml` holds the
team's deployments for `prefect deploy` (a work pool, one worker per GPU machine). Stopping
`sds serve` pauses the schedules.
"""

from __future__ import annotations

from sds.errors import ConfigError


def deployments(names: list[str] | None = None) -> list:
    """`pipeline/demo-on-demand` (the demo, any parameters when triggered) and
    `sweep/demo-nightly` (a small demo sweep at 03:00 UTC), or those of them named. Their names
    are not the team deployments' of `deployments/prefect.yaml` (`on-demand`, `nightly`): on one
    server, serving the demo must not take those over, nor pause them when it stops."""
    from prefect.schedules import Cron

    from tasks.config import SweepConfig

    from .pipeline import pipeline
    from .sweep import sweep

    found = [
        pipeline.to_deployment(
            name="demo-on-demand", tags=["sds", "demo"],
            description="The offline demo model, one method and pattern; SDS and its one-shot "
            "base."),
        sweep.to_deployment(
            name="demo-nightly", tags=["sds", "demo", "sweep"], schedules=[Cron("0 3 * * *",
                                                                           timezone="UTC")],
            description="A small demo sweep; calibration and dense evaluation are shared.",
            parameters={"config": SweepConfig(methods=["sparsegpt", "wanda"],
                                              patterns=["2:4", "50%"]).model_dump(mode="json")}),
    ]
    known = {d.name for d in found}
    missing = sorted(set(names or ()) - known)
    if missing:
        raise ConfigError(f"no deployment named {', '.join(missing)}; there are "
                          f"{', '.join(sorted(known))}")
    return [d for d in found if not names or d.name in names]


def serve(names: list[str] | None = None, limit: int | None = None) -> None:
    """Serve the deployments until interrupted (needs PREFECT_API_URL: a running server)."""
    import prefect

    prefect.serve(*deployments(names), limit=limit)
