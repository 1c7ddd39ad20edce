"""Optuna sweeper for Hydra (Optuna 5 ask/tell) with MLflow parent/child runs."""
