"""Evaluate a SAV (and baselines) on Ray Data; log it to MLflow; tag the model version.

The entry point of `ray job submit -- python jobs/evaluate.py ...`; the code is
`sav_ray/cli/evaluate.py`, and `sav-ray evaluate` runs the same with the same flags.
"""

import sys

from sav_ray.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
