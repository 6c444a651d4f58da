"""``vla-edge run`` in a process of its own, for the signal tests in test_run.py.

    python sim_child.py run --bundle B [--record DIR] ...     (the CLI's own arguments)

It is the real CLI with one addition: the loop drives the simulated base forward (so that a stop
is observable) and this process reports on stdout, one line every 50 ms::

    STATUS <base velocity m/s> <ticks recorded, or ticks run without --record>

and, when the CLI returns, ``BASE_LAST <vx> <wz>``: the last command the base simulator received.
"""

from __future__ import annotations

import sys
import threading
import time

from vla_edge.edge import cli
from vla_edge.edge.loop import ControlLoop

sims = []
_run = ControlLoop.run


def run_and_report(self: ControlLoop):
    sim = self.robot.sim
    sims.append(sim)
    self.base_plan = [(0.2, 0.0)] * 100_000

    recorder = next((o for o in self.observers if hasattr(o, "rows_written")), None)

    def report():
        while True:
            n = recorder.rows_written if recorder is not None else self.ticks  # rows on disk
            print(f"STATUS {sim.base.velocity()[0]:.3f} {n}", flush=True)
            time.sleep(0.05)

    threading.Thread(target=report, daemon=True).start()
    return _run(self)


ControlLoop.run = run_and_report

if __name__ == "__main__":
    rc = cli.main(sys.argv[1:])
    if sims:
        _, vx, wz = sims[0].base.commands[-1]
        print(f"BASE_LAST {vx} {wz}", flush=True)
    sys.exit(rc)
