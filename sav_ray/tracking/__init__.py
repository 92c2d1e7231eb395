"""The MLflow adapters: runs and their logged metrics and plots, the model registry (versions,
aliases, tags) and the pyfunc model a registered version loads as.

Imports the core and the pipelines' configuration; knows nothing of Ray Serve.
"""
