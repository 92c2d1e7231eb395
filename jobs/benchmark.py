"""Benchmark sav-ray against the SAVs reference method and against its own bare forward pass.

The entry point of `ray job submit -- python jobs/benchmark.py ...`; the code is
`sav_ray/cli/benchmark.py`, and `sav-ray benchmark` runs the same with the same flags.
"""

import sys

from sav_ray.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
