"""The benchmark's rows (`jobs/benchmark.py`): capture, fit and reducer scale, preprocessing, serving.

May import every layer below it; nothing imports it but the benchmark job and its tests.
"""
