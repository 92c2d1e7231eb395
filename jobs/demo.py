"""The offline demo (`make demo`): every step a user would run, on a tiny local model.

The entry point of `ray job submit -- python jobs/demo.py ...`; the code is
`sav_ray/cli/demo.py`, and `sav-ray demo` runs the same with the same flags.
"""

import sys

from sav_ray.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
