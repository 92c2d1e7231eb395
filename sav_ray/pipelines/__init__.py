"""The Ray layer: job configuration and flags, GPU placement, preflight checks, and the Ray Data
stages and pipelines of fit, predict and evaluate (CPU preprocessing tasks, model actors, reducers).

Imports the core (and fixtures nowhere); knows nothing of MLflow or Ray Serve.
"""
