"""Move a registered SAV model's alias, gated on evaluation; or roll it back.

The entry point of `ray job submit -- python jobs/promote.py ...`; the code is
`sav_ray/cli/promote.py`, and `sav-ray promote` runs the same with the same flags.
"""

import sys

from sav_ray.cli.promote import main

if __name__ == "__main__":
    sys.exit(main())
