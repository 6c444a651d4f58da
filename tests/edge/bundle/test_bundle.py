"""Bundle manifest: schema and integrity checked at load, before anything connects; --force safety.

Edits are made the way a user or a broken copy would make them: by rewriting ``manifest.json`` as plain
JSON. Where a test needs a *valid* hash over an edited manifest (to reach the schema check), it computes
it from the documented rule (sha256 of the canonical JSON: sorted keys, no spaces, UTF-8, every key but
``manifest_sha256``), not with vla-edge's own function.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from vla_edge.edge.bundle.manifest import Bundle, BundleError, check_replaceable


def _resign(m: dict) -> dict:
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return {**m, "manifest_sha256": hashlib.sha256(canonical).hexdigest()}


@pytest.fixture
def copy(fp32_bundle, tmp_path) -> Path:
    d = tmp_path / "b"
    shutil.copytree(fp32_bundle, d)
    return d


def _edit(d: Path, change, resign: bool) -> None:
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(_resign(m) if resign else m, indent=2))


def test_written_bundle_loads_and_carries_a_matching_manifest_hash(copy):
    m = json.loads((copy / "manifest.json").read_text())
    assert _resign(m)["manifest_sha256"] == m["manifest_sha256"]
    Bundle.load(copy)


def test_edited_action_hi_is_refused_in_one_line(copy):
    _edit(copy, lambda m: m["policy"]["action_hi"].__setitem__(0, m["policy"]["action_hi"][0] + 6.0), resign=False)
    with pytest.raises(BundleError, match="edited or corrupt"):
        Bundle.load(copy)
    for cmd in (("bench", "--bundle", str(copy), "--steps", "1"), ("run", "--bundle", str(copy), "--seconds", "1")):
        r = run_cli(*cmd, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "edited or corrupt" in lines[0], (cmd, r.stderr)


SCHEMA_CASES = {
    "role names an unlisted file": (lambda m: m["roles"].__setitem__("decoder", "evil.onnx"), "roles.decoder"),
    "n_bins 255 with 261 head ids": (lambda m: m["tokens"].__setitem__("n_bins", 255), "head_ids"),
    "version as a string": (lambda m: m.__setitem__("format_version", "1"), "must be the integer 1, got '1'"),
    "version 2": (lambda m: m.__setitem__("format_version", 2), "version 2 is not supported"),
    "action_lo above action_hi": (lambda m: m["policy"].__setitem__("action_lo", [9.0] * 14), "action_lo"),
    "short action_hi": (lambda m: m["policy"].__setitem__("action_hi", [1.0] * 13), "policy.action_hi"),
    "layers a string": (lambda m: m["model"]["text"].__setitem__("layers", "2"), "model.text.layers"),
    "tile off the canvas": (lambda m: m["image_layout"]["tiles"][0].__setitem__("w", 9999), "does not fit"),
    "fused without max_len": (lambda m: m.update(decoder_kind="fused", max_len=None), "max_len"),
    "path in files": (lambda m: m["files"].__setitem__("../x", {"sha256": "0" * 64, "bytes": 1}), "plain file name"),
    "no hash (older vla-edge)": (lambda m: m.pop("manifest_sha256"), "re-export"),
    "bin edges not ascending": (lambda m: m.update(bin_edges=[0.5] * m["tokens"]["n_bins"]), "bin_edges"),
    "unknown action encoding": (lambda m: m["policy"].__setitem__("actions", "zscore"), "policy.actions"),
    "negative std under sigma3": (lambda m: m["policy"].update(actions="sigma3", action_lo=[-0.1] * 14), "std"),
    "state_pad as long as the state": (lambda m: m["policy"].__setitem__("state_pad", [0.0] * 14), "state_pad"),
}


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=list(SCHEMA_CASES))
def test_schema_problems_are_refused_even_with_a_valid_hash(copy, case):
    change, phrase = SCHEMA_CASES[case]
    _edit(copy, change, resign=case != "no hash (older vla-edge)")
    with pytest.raises(BundleError) as e:
        Bundle.load(copy)
    assert phrase in str(e.value) and "\n" not in str(e.value)


def test_a_bundle_from_before_action_encodings_decodes_min_max(copy):
    """A manifest without ``policy.actions`` / ``policy.state_pad`` (written before they existed) still loads:
    actions decode with the bounds, as every bundle did then, and the state is not padded."""
    import numpy as np
    from vla_edge.edge.engine import Engine

    _edit(copy, lambda m: [m["policy"].pop(k) for k in ("actions", "state_pad")], resign=True)
    b = Bundle.load(copy)
    assert b.policy.actions == "bounds" and b.policy.state_pad == () and b.policy.robot_state_dim == 14
    engine = Engine(b, provider="cpu")
    lo, hi = np.array(b.policy.action_lo), np.array(b.policy.action_hi)
    ids = np.arange(b.tokens.vocab_base - 14, b.tokens.vocab_base)  # the 14 highest bins: centres near -1
    x = -1 + (2 * (b.tokens.vocab_base - ids - 1) + 1) / 255
    np.testing.assert_allclose(engine.detokenize(ids - (b.tokens.vocab_base - 256)).joints[0],
                               (x + 1) / 2 * (hi - lo) + lo, rtol=0, atol=1e-12)


def test_unknown_extra_keys_are_accepted(copy):
    _edit(copy, lambda m: m.update(statistics_source="statistics.yaml", bins={"kind": "uniform"}), resign=True)
    Bundle.load(copy)


# -- what export --force may replace -------------------------------------------------------------------
def test_check_replaceable(copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_replaceable(copy)  # a bundle: yes
    check_replaceable(tmp_path / "missing")  # nothing there: yes
    user = tmp_path / "mydata"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "f.pt").write_text("x")
    (copy / "best.pt").write_text("the checkpoint")
    refused = {
        user: "not a vla-edge bundle",
        tmp_path / "f.pt": "not a directory",
        tmp_path: "current directory",
        tmp_path.parent: "current directory",
    }
    for path, phrase in refused.items():
        with pytest.raises(BundleError, match=phrase):
            check_replaceable(path)
    with pytest.raises(BundleError, match="the checkpoint being exported"):
        check_replaceable(copy, keep=[copy / "best.pt"])
    assert (user / "notes.txt").read_text() == "mine"


def test_bundle_directory_is_readable_by_others(fp32_bundle):
    assert fp32_bundle.stat().st_mode & 0o777 == 0o755
