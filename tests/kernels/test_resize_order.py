"""The two orders of PIL's resize passes: ``resize_order="pillow-pre13"`` reproduces Pillow 10.3 (the LLaVA-VLA
reference's era) bit for bit, against a fixture made once with that Pillow (``tools/pillow_fixture.py`` says
how); ``"pillow13"`` is the installed Pillow 13's order. CALVIN's static view is where they differ."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from vla_edge.edge.bundle.manifest import check_manifest
from vla_edge.edge.bundle.spec import CALVIN_LAYOUT, ImageLayout
from vla_edge.kernels import Composer, _core
from vla_edge.tools.pillow_fixture import CALVIN_VIEW, CASES, image

FIXTURE = np.load(Path(__file__).with_name("data") / "pillow_10_3_resize.npz")


def test_the_fixture_is_pillow_10_3():
    assert str(FIXTURE["pillow"]) == "10.3.0"


@pytest.mark.parametrize("name", sorted(CASES))
def test_pre13_order_is_pillow_10_3_bit_for_bit(name):
    seed, (w, h), (ow, oh), filt = CASES[name]
    ours = _core.resize_rgb(image(seed, w, h), ow, oh, filt, order="pillow-pre13")
    np.testing.assert_array_equal(ours, FIXTURE[name])


def test_calvin_static_view_pre13_matches_pillow_10_3_and_pillow13_does_not():
    seed, (w, h), (ow, oh), filt = CALVIN_VIEW
    img = image(seed, w, h)
    digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()  # noqa: E731
    assert digest(_core.resize_rgb(img, ow, oh, filt, order="pillow-pre13")) == str(FIXTURE["calvin_view_sha256"])
    assert digest(_core.resize_rgb(img, ow, oh, filt, order="pillow13")) != str(FIXTURE["calvin_view_sha256"])


def test_calvin_composition_through_the_layout_field():
    static, gripper = image(10, 200, 200), image(11, 84, 84)
    layout = dataclasses.replace(CALVIN_LAYOUT, resize_order="pillow-pre13")
    out = Composer(layout, [static.shape, gripper.shape]).compose_uint8([static, gripper])
    assert hashlib.sha256(out.tobytes()).hexdigest() == str(FIXTURE["calvin_composition_sha256"])


def test_an_unknown_order_is_refused_and_an_old_layout_reads_as_pillow13(int8_bundle):
    bad = dataclasses.replace(CALVIN_LAYOUT, resize_order="pillow9")
    with pytest.raises(ValueError, match="resize_order"):
        Composer(bad, [(200, 200), (84, 84)])
    old = CALVIN_LAYOUT.to_dict()
    del old["resize_order"]  # a bundle written before the field
    assert ImageLayout.from_dict(old).resize_order == "pillow13"
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    assert check_manifest(manifest) is None
    manifest["image_layout"]["resize_order"] = "pillow9"
    assert "image_layout.resize_order" in check_manifest(manifest)
    del manifest["image_layout"]["resize_order"]
    assert check_manifest(manifest) is None
