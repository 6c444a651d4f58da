"""``vla-edge bench --plot``: the PNG is read back and looked at; without matplotlib it is refused up front."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli


def _near(img: np.ndarray, rgb: str, tol: float = 0.02) -> int:
    """Pixels of ``img`` (H, W, 3|4 floats in 0..1) within ``tol`` of the colour ``#rrggbb``."""
    want = np.array([int(rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img[..., :3] - want) < tol).all(-1).sum())


def test_bench_plot_draws_a_box_per_stage_and_run(tiny_ckpt, fused_fp32_bundle, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    png = tmp_path / "latency.png"
    r = run_cli("bench", "--bundle", str(fused_fp32_bundle), "--provider", "cpu", "--steps", "3", "--warmup", "0",
                "--parallel", "--baseline", "torch", "--ckpt", str(tiny_ckpt), "--plot", str(png))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote {png}" in r.stdout
    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (450, 900)  # 9 x 4.5 in at 100 dpi
    white = (img[..., :3] > 0.98).all(-1).mean()
    assert 0.5 < white < 0.98  # mostly background, but drawn on
    # the three runs (parallel decoding, sequential decoding, PyTorch) in matplotlib's first three colours
    # (each run's boxes are drawn; how many pixels depends on the latencies' spread, which a loaded box varies)
    assert _near(img, "#1f77b4") > 20 and _near(img, "#ff7f0e") > 20 and _near(img, "#2ca02c") > 20
    assert _near(img, "#d62728") == 0  # no fourth run


def test_bench_plot_without_matplotlib_is_refused_before_the_benchmark(tmp_path):
    png = tmp_path / "latency.png"
    (tmp_path / "b").mkdir()  # refused before the bundle is even loaded
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from vla_edge.edge.cli import main\n"
            f"sys.exit(main(['bench', '--bundle', {str(tmp_path / 'b')!r}, '--plot', {str(png)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "vla-edge bench: error: --plot needs matplotlib: pip install 'vla-edge[plot]'"
    assert not png.exists()
