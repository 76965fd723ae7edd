"""The pipeline layer: the run configuration (`tasks.config`), the plan that keys every stage
(`tasks.plan`), one Prefect task per stage (`tasks.stages`) and the artifact store
(`tasks.store`)."""
