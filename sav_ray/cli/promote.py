"""Move a registered SAV model's alias, gated on evaluation; or roll it back.

    python jobs/promote.py pets --from candidate --to production --min-accuracy 0.9 \
        --must-beat production
    python jobs/promote.py pets --to production --rollback

Gates read the `eval.*` tags that jobs/evaluate.py writes on each version: `--min-accuracy X`
refuses a lower accuracy, `--must-beat ALIAS` refuses unless the accuracy is strictly higher
than that version's on the same data. Who and when go into tags; `--rollback` points the alias
back at the version it had before the last promotion. Exit code 0: moved, 1: refused by a
gate, 2: error.
"""

from __future__ import annotations

import argparse
import sys

from sav_ray.cli import job_parser, parse_job_args
from sav_ray.core.errors import job_main
from sav_ray.tracking.registry import CANDIDATE, PromotionRefused, promote, rollback
from sav_ray.tracking.runs import use_store


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = job_parser("promote", __doc__)
    p.add_argument("name", help="registered model name")
    p.add_argument("--from", dest="source", default=CANDIDATE, help="alias to promote from")
    p.add_argument("--to", dest="target", default="production", help="alias to move")
    p.add_argument("--min-accuracy", type=float, default=None, help="refuse below this accuracy")
    p.add_argument("--must-beat", default=None, metavar="ALIAS", help="refuse unless better")
    p.add_argument("--rollback", action="store_true", help="return --to to its previous version")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (see jobs/fit.py)")
    args = parse_job_args(p, argv)
    return args


@job_main
def main(argv: list[str] | None) -> int:
    args = parse(argv)
    try:
        uri = use_store(args.tracking_uri)
        if args.rollback:
            move = rollback(args.name, args.target, uri=uri)
        else:
            move = promote(
                args.name, args.source, args.target, min_accuracy=args.min_accuracy,
                must_beat=args.must_beat, uri=uri,
            )  # fmt: skip
    except PromotionRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    print(("rolled back " if args.rollback else "promoted ") + move.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
