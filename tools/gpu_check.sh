#!/usr/bin/env bash
# tools/gpu_check.sh: every GPU number vla-edge reports, from one command on an NVIDIA machine (issue 14).
#
# What it does, in order (each stage fails fast with one line per missing piece):
#   1. checks   python 3.11/3.12, nvidia-smi, torch with CUDA (imported before onnxruntime, so that
#               onnxruntime-gpu finds the CUDA 13 / cuDNN libraries of torch's nvidia-* wheels)
#   2. installs what is missing into $SITE (default ~/site, put first on PYTHONPATH):
#               onnxruntime-gpu==1.31.1 (--no-deps) from $WHEELS (a .whl, or parts $WHEELS/p? that are
#               cat-ed into one) or the index; vla-edge itself from a vla_edge-*-cpXY-*.whl in $WHEELS,
#               else built from this checkout (30 s; needs scikit-build-core with packaging + pathspec,
#               pybind11, cmake >= 3.20 and a C++17 compiler: the Python ones installed from $WHEELS or
#               the index when missing); numpy, onnx, transformers, tokenizers, rich, pillow checked
#               (and tried from $WHEELS/the index, --no-deps)
#   3. export   vla-edge export --shape llava-ov-0.5b --target cuda (float16 graphs, MatMulNBits);
#               its parity step also runs the bundle on the GPU against PyTorch fp32 (parity.json:
#               variant int8@cuda, or gpu_error)
#   3b. placement  ONNX Runtime's profiler: the provider of every kernel run by each graph (node_providers.json)
#   4. bench    vla-edge bench --provider cuda --baseline torch (PyTorch float16 on the same GPU),
#               sequential and --parallel; then once more with the CUDA graph on (no baseline)
#   4b. batch   BatchedEngine on batches of 1/2/4/8: steps/s against one at a time, tokens equal (batch.json)
#   5. report   one JSON ($OUT/gpu_check.json) and a table on stdout
#
# Usage:
#   WHEELS=~/w tools/gpu_check.sh                      # the GPU run; results in $OUT (or ./gpu-check-out)
#   tools/gpu_check.sh --out DIR --steps 20
#   tools/gpu_check.sh --provider cpu --shape tiny     # dry run on a CPU: same stages, a tiny model
#
# Environment: WHEELS (wheel directories, ':'-separated, searched in order), SITE (install target, default ~/site), PYTHON (default python3),
# OUT (result directory), ORT_WHEEL (file name to give the cat-ed onnxruntime-gpu parts; default
# onnxruntime_gpu-1.31.1-<cpXY>-<cpXY>-manylinux_2_28_x86_64.whl: pip reads the version and tags from it).
# Budget: under 8 minutes on one H100 with 16 cores, export included (a stage past its limit stops it).
set -uo pipefail

PROVIDER=cuda
SHAPE=llava-ov-0.5b
STEPS=10
WARMUP=3
OUT_DIR="${OUT:-$PWD/gpu-check-out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --provider) PROVIDER="$2"; shift 2 ;;
    --shape) SHAPE="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_check: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$PROVIDER" in cuda|cpu) ;; *) echo "gpu_check: error: --provider cuda|cpu" >&2; exit 2 ;; esac
case "$SHAPE" in llava-ov-0.5b|tiny) ;; *) echo "gpu_check: error: --shape llava-ov-0.5b|tiny" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
SITE="${SITE:-$HOME/site}"
WHEELS="${WHEELS:-}"
IFS=: read -r -a WHEEL_DIRS <<< "$WHEELS"
WORK="$(mktemp -d /tmp/vla-edge-gpu-check.XXXXXX)"   # bundles (GBs) stay out of $OUT
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT_DIR" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export VLA_EDGE_CACHE="$WORK/cache"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
T0=$(date +%s)

say() { echo "gpu_check: $*" | tee -a "$LOG" >&2; }
die() { say "error: $*"; exit 1; }
stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, output to the log
  local name="$1" limit="$2"; shift 2
  local t=$(date +%s)
  say "$name ..."
  local rc=0
  timeout "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if [ $rc = 0 ]; then
    say "$name done in $(( $(date +%s) - t )) s"; return 0
  fi
  say "$name FAILED (exit $rc after $(( $(date +%s) - t )) s; last lines of $LOG follow)"
  tail -n 15 "$LOG" >&2
  return $rc
}
pyok() { "$PY" -c "$1" >/dev/null 2>&1; }
pip_target() { "$PY" -m pip install -q --no-deps --target "$SITE" "$@" >>"$LOG" 2>&1; }
from_wheels_or_index() {  # the pip arguments for packages: local wheels first, else the index
  local d
  [ -n "$WHEELS" ] || return 0
  printf -- '--no-index'
  for d in "${WHEEL_DIRS[@]}"; do printf -- ' --find-links %s' "$d"; done
}
first_match() {  # first_match GLOB: the first file matching GLOB in the wheel directories
  local d f
  for d in "${WHEEL_DIRS[@]}"; do
    for f in $d/$1; do [ -f "$f" ] && { echo "$f"; return 0; }; done
  done
  return 1
}

# ---- 1. checks ----------------------------------------------------------------------------------------
missing=0
"$PY" - <<'EOF' || { say "error: python 3.11 or 3.12 needed (PYTHON=$PY)"; missing=1; }
import sys
sys.exit(0 if sys.version_info[:2] in ((3, 11), (3, 12)) else 1)
EOF
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null || echo cp312)
if [ "$PROVIDER" = cuda ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || { say "error: no NVIDIA GPU (nvidia-smi -L failed)"; missing=1; }
  pyok 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { say "error: torch with CUDA is needed (the PyTorch baseline and the CUDA libraries for onnxruntime-gpu)"; missing=1; }
else
  pyok 'import torch' || { say "error: torch is needed (export and the PyTorch baseline)"; missing=1; }
fi
for d in "${WHEEL_DIRS[@]}"; do [ -d "$d" ] || { say "error: WHEELS entry $d is not a directory"; missing=1; }; done
[ $missing = 0 ] || exit 1

# ---- 2. installs --------------------------------------------------------------------------------------
ORT_CHECK='import torch, onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)'
if [ "$PROVIDER" = cuda ] && ! pyok "$ORT_CHECK"; then
  whl=""
  whl=$(first_match "onnxruntime_gpu-1.31.1-*.whl")
  part=$(first_match "p?")
  if [ -z "$whl" ] && [ -n "$part" ]; then
    parts=$(dirname "$part")
    whl="$WORK/${ORT_WHEEL:-onnxruntime_gpu-1.31.1-$PYTAG-$PYTAG-manylinux_2_28_x86_64.whl}"
    cat "$parts"/p? > "$whl"
    say "joined $(ls "$parts"/p? | wc -l) parts of $parts into $(basename "$whl") ($(du -m "$whl" | cut -f1) MB)"
  fi
  if [ -n "$whl" ]; then
    pip_target "$whl" || die "pip could not install $whl into $SITE (see $LOG)"
  else
    pip_target onnxruntime-gpu==1.31.1 || die "onnxruntime-gpu==1.31.1: no wheel in WHEELS and the index is unreachable"
  fi
  pyok "$ORT_CHECK" || die "onnxruntime-gpu installed but has no CUDA provider here: $("$PY" -c 'import torch, onnxruntime as o; print(o.__file__, o.get_available_providers())' 2>&1 | tail -n 1)"
fi
if ! pyok 'import vla_edge.kernels, vla_edge.export.fused'; then
  vwhl=$(first_match "vla_edge-*-$PYTAG-*.whl")
  if [ -n "$vwhl" ]; then
    pip_target "$vwhl" || die "pip could not install $vwhl"
  else
    # pyproject's minimum-version is scikit-build-core 1.1.2: an older one (a preinstalled image) refuses to build
    for need in "scikit_build_core:scikit-build-core==1.1.2:1.1.2" "pybind11:pybind11==3.1.0:3.0" "cmake:cmake:3.20"; do
      IFS=: read -r mod pkg min <<< "$need"
      pyok "import $mod, sys; from packaging.version import Version as V; sys.exit(V($mod.__version__) < V('$min'))" \
        || { [ "$mod" = cmake ] && command -v cmake >/dev/null 2>&1; } \
        || "$PY" -m pip install -q --target "$SITE" $(from_wheels_or_index) "$pkg" >>"$LOG" 2>&1 \
        || die "$pkg is needed to build vla-edge (with its dependencies: no wheel in WHEELS, no index)"
    done
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || die "a C++17 compiler (c++ or g++) is needed to build vla-edge"
    export PATH="$SITE/bin:$PATH"
    stage "build vla-edge" 300 "$PY" -m pip install --no-build-isolation --no-deps --target "$SITE" "$REPO" \
      || die "vla-edge did not build (see $LOG)"
  fi
fi
for need in numpy:numpy onnx:onnx transformers:transformers tokenizers:tokenizers rich:rich PIL:pillow; do
  mod="${need%%:*}"; pkg="${need#*:}"
  pyok "import $mod" || pip_target $(from_wheels_or_index) "$pkg" || say "error: python package $pkg is missing"
done
pyok 'import numpy, onnx, transformers, tokenizers, rich, PIL, vla_edge.kernels' || die "missing packages (above)"
say "ready in $(( $(date +%s) - T0 )) s: $("$PY" -c 'import torch, onnxruntime as o, vla_edge; print(f"torch {torch.__version__}, onnxruntime {o.__version__} {o.get_available_providers()}, vla_edge {vla_edge.__version__}")' 2>&1 | tail -n 1)"
VLA=("$PY" -m vla_edge.edge.cli)

# ---- 3. export ----------------------------------------------------------------------------------------
BUNDLE="$WORK/bundle-cuda"
if [ "$SHAPE" = tiny ]; then
  stage "tiny checkpoint" 120 "${VLA[@]}" tiny-ckpt --out "$WORK/tiny.pt" || exit 1
  SRC=(--ckpt "$WORK/tiny.pt"); BASE_CKPT=(--ckpt "$WORK/tiny.pt")
else
  SRC=(--shape "$SHAPE"); BASE_CKPT=()
fi
stage "export $SHAPE --target cuda (parity on $PROVIDER)" 400 \
  "${VLA[@]}" export "${SRC[@]}" --target cuda --out "$BUNDLE" --force --parity-samples 1 || exit 1
cp "$BUNDLE/parity.json" "$OUT_DIR/parity.json"
cp "$BUNDLE/manifest.json" "$OUT_DIR/manifest.json"

# ---- 3b. where every node ran (ONNX Runtime's profiler: the provider of each executed kernel) ------------
cat > "$WORK/placement.py" <<'PYEOF'
import json, sys
from pathlib import Path

import numpy as np
import torch  # noqa: F401 (before onnxruntime: the CUDA libraries)
import onnxruntime as ort

bundle, out, provider = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
m = json.loads((bundle / "manifest.json").read_text())
act = {"float16": np.float16, "float32": np.float32}[m["dtypes"]["decoder"]["activations"]]
t, rows = m["model"]["text"], m["max_len"]
hd = t["hidden"] // t["heads"]
size = m["image_layout"]["output"]
feeds = {"vision": {"pixels": np.zeros((1, 3, size, size), np.float32)},
         "decoder": {"image_embeds": np.zeros((1, 0, t["hidden"]), act), "head_index": np.zeros((1, 0), np.int64),
                     "inputs_embeds": np.zeros((1, 4, t["hidden"]), act), "logit_index": np.array([3]),
                     "seqlens_k": np.array([3], np.int32), "total_sequence_length": np.array(4, np.int32),
                     **{f"past.{i}.{k}": np.zeros((1, t["kv_heads"], rows, hd), act)
                        for i in range(t["layers"]) for k in ("key", "value")}}}
providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
report = {}
for graph, feed in feeds.items():
    so = ort.SessionOptions()
    so.enable_profiling, so.log_severity_level = True, 3
    so.profile_file_prefix = str(out / f"profile_{graph}")
    s = ort.InferenceSession(str(bundle / f"{graph}.onnx"), so, providers=providers)
    s.run(None, feed)
    nodes = {}
    for e in json.loads(Path(s.end_profiling()).read_text()):
        a = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in a:
            nodes[e["name"].rsplit("_kernel_time", 1)[0]] = (a["provider"], a.get("op_name"))
    by = {}
    for prov, op in nodes.values():
        by.setdefault(prov, {}).setdefault(op, 0)
        by[prov][op] += 1
    report[graph] = {"kernels_by_provider": by,
                     "cpu_nodes": sorted(n for n, (p, _) in nodes.items() if p == "CPUExecutionProvider")}
    print(f"{graph}: " + "; ".join(f"{p}: {sum(v.values())} kernels" for p, v in by.items()))
(out / "node_providers.json").write_text(json.dumps(report, indent=2) + "\n")
PYEOF
stage "node placement (profiler)" 120 "$PY" "$WORK/placement.py" "$BUNDLE" "$OUT_DIR" "$PROVIDER"
rm -f "$OUT_DIR"/profile_*.json

# ---- 4. bench -----------------------------------------------------------------------------------------
stage "bench --provider $PROVIDER --baseline torch --parallel" 200 \
  "${VLA[@]}" bench --bundle "$BUNDLE" --provider "$PROVIDER" --baseline torch "${BASE_CKPT[@]}" --parallel \
  --steps "$STEPS" --warmup "$WARMUP" --json "$OUT_DIR/bench.json"
bench_rc=$?
if [ "$PROVIDER" = cuda ]; then  # last: a CUDA graph that cannot be captured must not cost the numbers above
  stage "bench --provider cuda --parallel --cuda-graph" 90 \
    "${VLA[@]}" bench --bundle "$BUNDLE" --provider cuda --parallel --cuda-graph --steps "$STEPS" \
    --warmup "$WARMUP" --json "$OUT_DIR/bench_cuda_graph.json"
fi

# ---- 4b. batch ------------------------------------------------------------------------------------------
cat > "$WORK/batch.py" <<'PYEOF'
"""Batches of 1/2/4/8 observations on the bundle: steps/s against one at a time, and tokens equal (batch.json)."""
import json, sys, time
from pathlib import Path
import numpy as np
from vla_edge.edge.batch import BatchedEngine, Observation, batch_refusal
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.engine import Engine

bundle, out, provider = Bundle.load(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if why := batch_refusal(bundle.manifest):
    (out / "batch.json").write_text(json.dumps({"off": why}) + "\n")
    print("batching off:", why)
    sys.exit(0)
engine = Engine(bundle, provider=provider)
rng, s = np.random.default_rng(0), bundle.layout.output
obs = [Observation(rng.normal(0, 0.3, bundle.policy.robot_state_dim), ["pick up the red cube", "go left", "open the top drawer slowly"][i % 3],
                   pixels=rng.uniform(-1, 1, (1, 3, s, s)).astype(np.float32)) for i in range(8)]
def p50(f, n=5):
    f()
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
    return float(np.median(t)) * 1e3
alone = []
for o in obs:
    engine.start_episode(o.instruction)
    alone.append(engine.step(None, o.state, pixels=o.pixels).token_ids)
engine.start_episode(obs[0].instruction)
one_ms = p50(lambda: engine.step(None, obs[0].state, pixels=obs[0].pixels))
batch = BatchedEngine(engine)
rows = []
for n in (1, 2, 4, 8):
    got = batch.step(obs[:n])
    same = all(np.array_equal(g.token_ids, a) for g, a in zip(got, alone))
    ms = p50(lambda: batch.step(obs[:n]))
    rows.append({"robots": n, "p50_ms": ms, "steps_per_s": n * 1e3 / ms, "x": n * one_ms / ms, "tokens_equal": same})
    print(rows[-1])
(out / "batch.json").write_text(json.dumps({"one_at_a_time_p50_ms": one_ms, "batches": rows}, indent=2) + "\n")
PYEOF
stage "batches of 1/2/4/8 (BatchedEngine)" 120 "$PY" "$WORK/batch.py" "$BUNDLE" "$OUT_DIR" "$PROVIDER"

# ---- 5. report ----------------------------------------------------------------------------------------
"$PY" - "$OUT_DIR" "$SHAPE" "$PROVIDER" "$(( $(date +%s) - T0 ))" <<'EOF' | tee -a "$LOG"
import json, platform, subprocess, sys
from pathlib import Path

out, shape, provider, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
gpu = None
if provider == "cuda":
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
report = {"shape": shape, "provider": provider, "gpu": gpu, "machine": platform.platform(), "seconds": seconds,
          "parity": load("parity.json"), "node_providers": load("node_providers.json"),
          "bench": load("bench.json"), "bench_cuda_graph": load("bench_cuda_graph.json"), "batch": load("batch.json")}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

def row(label, d, key="p50"):
    return f"  {label:<44}{d[key]:>10.2f}" if d else f"  {label:<44}{'-':>10}"
print(f"\nvla-edge gpu check: {shape} on {gpu or provider} ({seconds} s)")
par = report["parity"] or {}
for name, v in par.get("variants", {}).items():
    print(f"  parity {name:<8} on {par.get('providers', {}).get(name, '?'):<24} logits max err {v['logit_max_abs_err']:.3g}, "
          f"cos {v['logit_cosine_min']:.5f}, chunks identical {v['chunks_identical']}")
for graph, v in (report["node_providers"] or {}).items():
    counts = ", ".join(f"{p.replace('ExecutionProvider', '')} {sum(ops.values())}" for p, ops in v["kernels_by_provider"].items())
    cpu = f"; on the CPU: {', '.join(v['cpu_nodes'][:6])}" if provider == "cuda" and v["cpu_nodes"] else ""
    print(f"  {graph} kernels by provider: {counts}{cpu}")
if par.get("gpu_error"):
    print(f"  parity on the GPU failed: {par['gpu_error']}")
for key, title in (("bench", "engine"), ("bench_cuda_graph", "CUDA graph on")):
    b = report[key]
    if not b:
        if provider == "cuda" or key == "bench":
            print(f"  {title}: no result (see gpu_check.log)")
        continue
    print(f"  -- {title}: p50 ms (parallel decoding; sequential below)")
    for stage, v in b["stages_ms"].items():
        print(row(stage, v))
    s = b.get("sequential")
    if s:
        print(row("decode, sequential", s["stages_ms"]["decode"]))
        print(row("total, sequential", s["stages_ms"]["total"]))
        print(f"  {'decoder calls per chunk (parallel / sequential)':<44}{b['decode_calls_per_chunk']['p50']:>6.0f} / "
              f"{s['decode_calls_per_chunk']['p50']:.0f}; decode ratio {b['parallel_decode_speedup_p50']:.2f}x")
    if b.get("gpu"):
        print(f"  {'engine GPU memory (MB, nvidia-smi delta)':<44}{b['gpu']['engine_memory_mb']}")
    base = b.get("baseline")
    if base:
        print(row("PyTorch total (" + base["kind"].split(",")[0] + ")", base["stages_ms"]["total"]))
        print(f"  {'speed-up vs PyTorch (p50 total)':<44}{base['speedup_p50']:>10.2f}x; chunks identical {base['chunks_identical']}")
        if "torch_peak_memory_mb" in base:
            print(f"  {'PyTorch peak GPU memory (MB)':<44}{base['torch_peak_memory_mb']:>10.0f}")
bt = report["batch"] or {}
if bt.get("off"):
    print(f"  batches: off ({bt['off']})")
for r in bt.get("batches", []):
    print(f"  {'batch of ' + str(r['robots']) + ' (p50 ms, steps/s, x one at a time)':<44}{r['p50_ms']:>10.2f}"
          f"{r['steps_per_s']:>9.1f}{r['x']:>7.2f}x  tokens equal {r['tokens_equal']}")
print(f"\nwrote {out / 'gpu_check.json'}")
EOF
exit $bench_rc
