"""Classify a manifest with one or more SAV artifacts on Ray Data; write one result per row.

The entry point of `ray job submit -- python jobs/predict.py ...`; the code is
`sav_ray/cli/predict.py`, and `sav-ray predict` runs the same with the same flags.
"""

import sys

from sav_ray.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
