"""sav-ray: Sparse Attention Vectors (Mitra et al., arXiv 2412.00142) on Ray, MLflow and Ray Serve.

The core (model adapters, capture, reduce, vote, artifact) is plain Python/torch/numpy;
Ray Data, MLflow and Ray Serve are thin adapters around it.
"""

__version__ = "0.1.0"
