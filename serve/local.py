"""Serve one artifact on this machine, classify a manifest over HTTP, print the accuracy, stop.

`python -m serve.local ...` is `sav-ray serve ...`; the code is `sav_ray/cli/serve.py`.
"""

import sys

from sav_ray.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
