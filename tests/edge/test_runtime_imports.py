"""The robot-side runtime must not import torch or transformers (they are an install extra), nor Rerun or
matplotlib (``--view`` and ``bench --plot`` import them when asked), nor Ray (only ``vla-edge serve`` does:
the robot's policy-server client is the standard library's HTTP)."""

import subprocess
import sys

RUNTIME = [
    "vla_edge.edge.cli",
    "vla_edge.edge.session",
    "vla_edge.edge.loop",
    "vla_edge.edge.engine",
    "vla_edge.edge.bundle.manifest",
    "vla_edge.edge.robot",
    "vla_edge.firmware_bridge.cameras",
    "vla_edge.edge.estop.latch",
    "vla_edge.edge.estop.signals",
    "vla_edge.edge.estop.keyboard",
    "vla_edge.edge.episodes.recorder",
    "vla_edge.edge.cli.check",
    "vla_edge.edge.sim.task",
    "vla_edge.edge.sim.evaluate",
    "vla_edge.firmware_bridge.piper_arm",
    "vla_edge.firmware_bridge.tracer_base",
    "vla_edge.kernels",
    "vla_edge.edge.cli.bench",  # matplotlib only for --plot
    "vla_edge.edge.episodes.view",  # rerun only when a view is asked for
    "vla_edge.edge.remote",  # run --policy-server: no ray on the robot
    "vla_edge.edge.serve.handler",  # the server's engine side, apart from Ray
    "vla_edge.edge.cli.serve",  # ray only when the command runs
]


def test_runtime_imports_neither_torch_nor_transformers_nor_rerun_nor_matplotlib_nor_ray():
    code = (
        "import sys, importlib\n"
        f"for m in {RUNTIME!r}: importlib.import_module(m)\n"
        "heavy = sorted({'torch', 'transformers', 'PIL', 'rerun', 'matplotlib', 'ray'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_runtime_engine_runs_without_torch(int8_bundle):
    """A full policy step with torch made unimportable, as on a robot without the [export] extra."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import numpy as np\n"
        "from vla_edge.edge.bundle.manifest import Bundle\n"
        "from vla_edge.edge.engine import Engine\n"
        "from vla_edge.edge.cli.bench import synthetic_inputs\n"
        f"e = Engine(Bundle.load({str(int8_bundle)!r}), provider='cpu')\n"
        "frames, state = synthetic_inputs(e.bundle.layout, 14)\n"
        "e.start_episode('pick up the red cube')\n"
        "c = e.step(frames, state)\n"
        "assert c.joints.shape == (5, 14) and np.isfinite(c.joints).all()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_lower_rooms_do_not_import_the_runtime():
    """kernels/ and firmware_bridge/ sit below edge/: importing every module of theirs loads no
    ``vla_edge.edge`` module (limits come in through their configs; the shared error is the import root's)."""
    import pkgutil

    import vla_edge.firmware_bridge
    import vla_edge.kernels

    modules = ["vla_edge.kernels", "vla_edge.kernels.reference"] + [
        f"vla_edge.firmware_bridge.{m.name}" for m in pkgutil.iter_modules(vla_edge.firmware_bridge.__path__)]
    assert len(modules) >= 8
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.startswith('vla_edge.edge'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
