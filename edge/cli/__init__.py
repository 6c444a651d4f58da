"""The ``vla-edge`` command line: the parser (:mod:`.parser`), the argument checks (:mod:`.checks`) and every
command's ``main``, one module per command family (:mod:`.run`, :mod:`.record`, :mod:`.evaluate`,
:mod:`.episodes`, :mod:`.bench`, :mod:`.check`; export's and train-tiny's live in ``vla_edge.export`` and
``vla_edge.tools``). Only this package imports ``export/`` and ``tools/``.

Errors a user can act on (:class:`VlaEdgeError`) print as one line and exit 2; ``--debug`` shows the
traceback. Usage::

    vla-edge run --robot sim --seconds 10
    python -m vla_edge.edge.cli run --robot sim --seconds 10     # the same
"""

from __future__ import annotations

import logging
import sys

from vla_edge import VlaEdgeError
from vla_edge.edge.cli.checks import validate
from vla_edge.edge.cli.parser import build_parser
from vla_edge.edge.telemetry import setup_logging

log = logging.getLogger("vla_edge")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    try:
        validate(args)
        return args.func(args)
    except VlaEdgeError as e:
        if args.debug:
            raise
        print(f"vla-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vla-edge {args.command}: interrupted", file=sys.stderr)
        return 130
