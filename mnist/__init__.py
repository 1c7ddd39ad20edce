"""MNIST CNN trained with PyTorch Lightning, swept with Optuna, tracked in MLflow."""
