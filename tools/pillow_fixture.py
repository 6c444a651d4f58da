"""Make the Pillow resize fixture the kernel tests compare ``resize_order="pillow-pre13"`` against.

Pillow 13 changed the order of PIL's two resize passes (the vertical pass goes first when the height shrinks by
more than twice as many pixels as the width); the LLaVA-VLA reference's training images were made before that.
This script resizes fixed, seeded images with whatever Pillow runs it and writes the results, with the Pillow
version, to an ``.npz``. The committed ``tests/kernels/data/pillow_10_3_resize.npz`` was made with Pillow 10.3.0
(the reference's era; numpy 2.4.6, Python 3.11) in a scratch venv::

    python3.11 -m venv /tmp/pil10 && /tmp/pil10/bin/pip install pillow==10.3.0 numpy==2.4.6
    /tmp/pil10/bin/python tools/pillow_fixture.py tests/kernels/data/pillow_10_3_resize.npz

Cases (input seed, input size, output size, filter): small ones stored whole, CALVIN's static view
(200x200 -> 334x167 LANCZOS) and its whole two-view composition stored as SHA-256 of the uint8 result.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
from PIL import Image

CASES = {  # name: (seed, (in_w, in_h), (out_w, out_h), filter)
    "tall_lanczos": (1, (60, 60), (100, 50), "lanczos"),
    "tall_bicubic": (2, (48, 64), (40, 24), "bicubic"),
    "wide_lanczos": (3, (64, 48), (30, 40), "lanczos"),
}
CALVIN_VIEW = (4, (200, 200), (334, 167), "lanczos")
FILTERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}


def image(seed: int, w: int, h: int) -> np.ndarray:
    """A camera-like test image: smooth gradients, edges and sensor noise, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx // 7 + yy // 5) % 2 * 200], -1)
    return np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)


def resize(img: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize(size, FILTERS[name]))


def calvin_composition(seed: int) -> np.ndarray:
    """CALVIN's two views (200x200 static over 84x84 gripper) -> 334x334 canvas -> 384x384 BICUBIC."""
    canvas = Image.new("RGB", (334, 334))
    canvas.paste(Image.fromarray(resize(image(seed, 200, 200), (334, 167), "lanczos")), (0, 0))
    canvas.paste(Image.fromarray(resize(image(seed + 1, 84, 84), (334, 167), "lanczos")), (0, 167))
    return np.asarray(canvas.resize((384, 384), Image.BICUBIC))


def main(out: str) -> None:
    import PIL

    arrays = {name: resize(image(seed, *src), dst, f) for name, (seed, src, dst, f) in CASES.items()}
    seed, src, dst, f = CALVIN_VIEW
    arrays["calvin_view_sha256"] = np.array(hashlib.sha256(resize(image(seed, *src), dst, f).tobytes()).hexdigest())
    arrays["calvin_composition_sha256"] = np.array(hashlib.sha256(calvin_composition(10).tobytes()).hexdigest())
    arrays["pillow"] = np.array(PIL.__version__)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} with Pillow {PIL.__version__}")


if __name__ == "__main__":
    main(sys.argv[1])
