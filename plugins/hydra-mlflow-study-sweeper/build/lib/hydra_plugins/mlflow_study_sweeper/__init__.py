"""A Hydra sweeper for any app: an Optuna study (ask/tell) whose trials are MLflow child runs.

What Hydra's plugin scan imports (this package, `config`, `mlflow_study_sweeper`, `job`, `cli`)
stays light; the work lives in the `_`-prefixed modules, which the scan skips.
"""
