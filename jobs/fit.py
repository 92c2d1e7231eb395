"""Fit a Sparse Attention Vector classifier on Ray and write its artifact.

The entry point of `ray job submit -- python jobs/fit.py ...`; the code is
`sav_ray/cli/fit.py`, and `sav-ray fit` runs the same with the same flags.
"""

import sys

from sav_ray.cli.fit import main

if __name__ == "__main__":
    sys.exit(main())
