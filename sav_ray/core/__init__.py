"""The core: capture, reduce, vote, probabilities and the artifact, on torch, transformers and numpy.

Nothing here imports Ray, MLflow or Ray Serve; every other layer builds on this one.
"""
