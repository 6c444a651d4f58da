"""``python -m vla_edge.edge.cli ...``: the same as the ``vla-edge`` command."""

import sys

from vla_edge.edge.cli import main

sys.exit(main())
