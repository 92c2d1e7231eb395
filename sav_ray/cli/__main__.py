"""`python -m sav_ray.cli <command> ...` is `sav-ray <command> ...`."""

import sys

from sav_ray.cli.main import main

sys.exit(main())
