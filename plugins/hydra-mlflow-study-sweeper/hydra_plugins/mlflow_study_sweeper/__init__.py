"""The Hydra plugin: the sweeper `mlflow_study` that Hydra's plugin scan finds.

Only the facade lives here (`config`, `mlflow_study_sweeper`, and `job` and `cli` under their
first names); the scan imports each of them, so they load Hydra and the standard library only.
The work lives in the `mlflow_study_sweeper` package beside this one, loaded when a sweep runs.
"""
