#!/usr/bin/env bash
# Every GPU-only check and benchmark of vesper-sdk, for a lent H100/H200, in under 8 minutes.
#
#   here, once:  ./benchmarks/fetch_gpu_wheels.sh          # bitsandbytes into .whl/
#   device run:  carry [".whl"], command "bash benchmarks/gpu_suite.sh", timeout_s 540
#   elsewhere:   bash benchmarks/gpu_suite.sh   (any CUDA machine; OUT: /tmp/vesper-gpu-results)
#
# Steps (each under `timeout`, each recorded; a failure never stops the later steps):
#   1 env          nvidia-smi, python/torch/triton/... versions              -> env.json
#   2 install      carried wheels (.whl/) into /tmp/site; vesper_sdk made importable
#                  with its package-dir mapping (see below)                    -> env.json
#   3 kernels      benchmarks/gpu_checks.py: the compiled Velvet kernel vs its torch
#                  reference (fp32/bf16/fp16, ragged layouts, a 50 M-element buffer) and
#                  VelvetOptimizer vs torch AdamW on CUDA                     -> kernels.json
#     velvet_tests pytest tests/test_velvet_kernel.py with TRITON_INTERPRET unset and
#                  VESPER_TEST_DEVICE=cuda                                -> velvet_tests.json
#   4 optimizer    benchmarks/optimizer.py --preset medium --device cuda     -> optimizer.json
#   5 train_step   benchmarks/train_step.py, medium, B=8, S=1024 (bf16, compile, SDPA) vs
#                  seed-style                                                -> train_step.json
#   6 generate     benchmarks/generate.py --device cuda (graph/compiled decode vs HF)
#                                                                             -> generate.json
#   7 bnb          bitsandbytes int8/nf4 quantize + reload + generate on the GPU -> bnb.json
#   8 ort          ONNX Runtime CUDA provider: reported, "absent" in the image -> env.json
# Steps 4-6 go through benchmarks/suite.py (its cuda-sized arguments), so their JSON
# carries the command, machine, versions and date like every other result.
#
# $OUT gets at most 8 files (the device returns no more): the 7 JSON files above and
# bundle.tar.gz (every step's log, the markdown tables, SUMMARY.md, charts, steps table).
# The last thing printed is the table of steps: status, seconds, key figure.
#
# Why the package is installed editable (pip install -e . --no-build-isolation --no-index):
# pyproject maps top-level kernels/, export/, benchmarks/ into vesper_sdk.*, which a bare
# PYTHONPATH=$PWD cannot express; the image has setuptools, and --no-build-isolation
# --no-index keep pip from looking for a build backend on the network (there is none).
# If that fails (e.g. the image's setuptools is older than 77, which pyproject's SPDX
# license string needs), a sitecustomize.py on PYTHONPATH installs the same mapping, read
# from pyproject.toml, as an import hook (no build at all).
# The repo root itself is NOT put on PYTHONPATH: it would make the generic name `kernels`
# importable, which bitsandbytes probes for (the `kernels` hub package) and trips over.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT="${OUT:-/tmp/vesper-gpu-results}"   # the device sets OUT; elsewhere, outside the repo
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_SUITE_BUDGET_S:-460}"   # 8 minutes, less a margin for the bundle and table
WORK="$(mktemp -d /tmp/vesper-gpu-suite.XXXXXX)"
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
STEPS="$WORK/steps.tsv"
: >"$STEPS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET   # compile the kernels for real
SECONDS=0

note() { printf '\n==== %s (t=%ss)\n' "$*" "$SECONDS"; }

# record NAME STATUS SECONDS JSON_FILE  -- one line of the final table
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }

# limit_for WANTED -> seconds this step may run, within what is left of the budget
limit_for() {
    local left=$((BUDGET_S - SECONDS - 5))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

# fail_json FILE STEP STATUS RC LOG -- a step that wrote no JSON still leaves one
fail_json() {
    "$PY" - "$@" <<'EOF'
import json, sys
path, step, status, rc, log = sys.argv[1:6]
try:
    tail = open(log, errors="replace").read().strip().splitlines()[-25:]
except OSError:
    tail = []
json.dump({"step": step, "status": status, "returncode": int(rc), "log_tail": tail},
          open(path, "w"), indent=2)
EOF
}

# run_step NAME WANTED_S JSON CMD...  -- run CMD under timeout, log it, record the outcome
run_step() {
    local name=$1 wanted=$2 json=$3
    shift 3
    local limit
    limit=$(limit_for "$wanted")
    if [ "$limit" -lt 15 ]; then
        note "$name: skipped, the 8-minute budget is spent"
        fail_json "$json" "$name" "skipped" 0 /dev/null
        record "$name" "skipped" 0 "$json"
        return
    fi
    note "$name (limit ${limit}s): $*"
    local t0=$SECONDS rc status
    timeout --kill-after=10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    tail -n 40 "$WORK/logs/$name.log"
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status="failed(rc=$rc)" ;;
    esac
    [ -s "$json" ] || fail_json "$json" "$name" "$status" "$rc" "$WORK/logs/$name.log"
    record "$name" "$status" $((SECONDS - t0)) "$json"
}

# ---------------------------------------------------------------------------- 1 env
note "1 env"
t0=$SECONDS
{ nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv; } >"$WORK/logs/nvidia-smi.log" 2>&1
head -n 20 "$WORK/logs/nvidia-smi.log"
record env ok $((SECONDS - t0)) "$OUT/env.json"

# ------------------------------------------------------------------------ 2 install
note "2 install"
t0=$SECONDS
install_status=ok
WHEELS=none
if ls .whl/*.whl >/dev/null 2>&1; then
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl >"$WORK/logs/install.log" 2>&1; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        WHEELS=$(cd .whl && ls -- *.whl | tr '\n' ' ')
    else
        install_status="failed(wheels)"
    fi
fi
INSTALL_METHOD="${VESPER_GPU_INSTALL:-editable}"   # "hook" forces the fallback (to test it)
if [ "$INSTALL_METHOD" != editable ] || ! timeout 120 "$PY" -m pip install -q --no-deps \
    --no-build-isolation --no-index -e . >>"$WORK/logs/install.log" 2>&1; then
    INSTALL_METHOD=hook
    mkdir -p /tmp/vesper-hook
    "$PY" - "$REPO" /tmp/vesper-hook/sitecustomize.py >>"$WORK/logs/install.log" 2>&1 <<'EOF'
# Write a sitecustomize.py that maps vesper_sdk and its package-dir entries from pyproject
# (vesper_sdk.kernels -> kernels/, ...) the way setuptools' editable finder does: first
# on sys.meta_path, so it also wins when a script puts the repo root on sys.path.
import os, sys, tomllib
repo, dst = sys.argv[1:3]
cfg = tomllib.load(open(os.path.join(repo, "pyproject.toml"), "rb"))
mapping = {k: os.path.join(repo, v) for k, v in cfg["tool"]["setuptools"]["package-dir"].items()}
open(dst, "w").write(f"""import importlib.util, sys
MAPPING = {mapping!r}
class _VesperFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = MAPPING.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder + "/__init__.py", submodule_search_locations=[folder])
sys.meta_path.insert(0, _VesperFinder)
""")
print("wrote", dst, "mapping", mapping)
EOF
    export PYTHONPATH="/tmp/vesper-hook${PYTHONPATH:+:$PYTHONPATH}"
fi
# Import from outside the repo, so the check sees what the steps below will see.
if ! (cd /tmp && "$PY" -c "import vesper_sdk.kernels.velvet, vesper_sdk.benchmarks.suite, \
vesper_sdk.optim; print('vesper_sdk from', vesper_sdk.__file__)") >>"$WORK/logs/install.log" 2>&1
then
    install_status="failed(import)"
fi
tail -n 5 "$WORK/logs/install.log"
echo "install: $install_status via $INSTALL_METHOD; wheels: $WHEELS"
record install "$install_status" $((SECONDS - t0)) "$OUT/env.json"

# ------------------------------------------------------------- 1+2+8 env.json, ort
note "8 ort + env.json"
t0=$SECONDS
timeout 60 "$PY" - "$OUT/env.json" "$INSTALL_METHOD" "$WHEELS" "$WORK/logs/nvidia-smi.log" \
    >"$WORK/logs/ort.log" 2>&1 <<'EOF'
import json, os, subprocess, sys
out, method, wheels, smi_log = sys.argv[1:5]
env = {"install_method": method, "wheels": wheels.split(), "pythonpath": os.environ.get(
    "PYTHONPATH", "")}
try:
    from vesper_sdk.benchmarks.suite import machine_info, package_versions
    env["machine"], env["versions"] = machine_info("cuda"), package_versions()
except Exception as exc:
    env["suite_import_error"] = f"{type(exc).__name__}: {exc}"
env["nvidia_smi"] = open(smi_log, errors="replace").read().splitlines()[-3:]
try:
    import onnxruntime as ort
    providers = ort.get_available_providers()
    env["ort"] = {"version": ort.__version__, "providers": providers,
                  "cuda_provider": "present" if "CUDAExecutionProvider" in providers
                  else "absent"}
except Exception as exc:
    env["ort"] = {"cuda_provider": "absent", "error": f"{type(exc).__name__}: {exc}"}
for pkg in ("setuptools", "bitsandbytes", "transformers"):
    r = subprocess.run([sys.executable, "-m", "pip", "show", pkg], capture_output=True,
                       text=True)
    ver = [ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines()
           if ln.startswith("Version:")]
    env.setdefault("pip_show", {})[pkg] = ver[0] if ver else "absent"
json.dump(env, open(out, "w"), indent=2)
print(json.dumps({k: env.get(k) for k in ("machine", "versions", "ort", "pip_show")}, indent=1))
EOF
rc=$?
cat "$WORK/logs/ort.log"
ort_status=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['ort']\
['cuda_provider'])" "$OUT/env.json" 2>/dev/null || echo "unknown(rc=$rc)")
record ort "$ort_status" $((SECONDS - t0)) "$OUT/env.json"

# ------------------------------------------------------------------------ 3 kernels
run_step kernels 100 "$OUT/kernels.json" \
    "$PY" benchmarks/gpu_checks.py --checks kernel,optimizer --device cuda \
    --json "$OUT/kernels.json"

# The Velvet engineer's kernel tests, compiled rather than interpreted where they honour
# VESPER_TEST_DEVICE; their JUnit report becomes velvet_tests.json.
run_step velvet_tests 60 "$OUT/velvet_tests.json" \
    env VESPER_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_velvet_kernel.py --junitxml "$WORK/logs/velvet_tests.xml"
"$PY" - "$WORK/logs/velvet_tests.xml" "$OUT/velvet_tests.json" <<'EOF' >/dev/null 2>&1 || true
import json, sys
import xml.etree.ElementTree as ET
src, dst = sys.argv[1:3]
suite = ET.parse(src).getroot()  # no report: keep run_step's JSON (status + log tail)
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
a["failed"] = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
a["headline"] = f"{a['tests'] - a['failures'] - a['errors']}/{a['tests']} passed"
json.dump(a, open(dst, "w"), indent=2)
EOF

# ------------------------------------------------------------ 4-6 benchmarks (suite)
bench_step() {  # bench_step NAME WANTED_S: one benchmark through the suite, cuda sizes
    local name=$1 limit
    limit=$(limit_for "$2")
    # The suite stops the benchmark itself 10 s before `timeout` would, so a slow
    # benchmark is still recorded (status timeout) with its command and output.
    run_step "$name" "$limit" "$OUT/$name.json" \
        "$PY" benchmarks/suite.py --only "$name" --device cuda --out-dir "$WORK/results" \
        --no-charts --timeout $((limit > 25 ? limit - 10 : 15))
    cp -f "$WORK/results/$name.json" "$OUT/$name.json" 2>/dev/null || true
}
bench_step optimizer 90
bench_step train_step 170
bench_step generate 100

# ---------------------------------------------------------------------------- 7 bnb
if "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
    run_step bnb 60 "$OUT/bnb.json" \
        "$PY" benchmarks/gpu_checks.py --checks bnb --device cuda --json "$OUT/bnb.json"
else
    why="bitsandbytes is not in the image and no .whl/ was carried"
    why="$why (run benchmarks/fetch_gpu_wheels.sh first, and carry .whl)"
    printf '{"status": "absent", "why": "%s"}\n' "$why" >"$OUT/bnb.json"
    record bnb "absent(no wheel)" 0 "$OUT/bnb.json"
fi

# ------------------------------------------------------------------ charts, bundle
note "charts + bundle"
timeout 60 "$PY" benchmarks/charts.py --results "$WORK/results" >"$WORK/logs/charts.log" 2>&1 \
    || echo "charts failed: $(tail -n 3 "$WORK/logs/charts.log")"
cp -f "$STEPS" "$WORK/logs/" 2>/dev/null
tar -czf "$OUT/bundle.tar.gz" -C "$WORK" logs results 2>/dev/null

# ------------------------------------------------------------------- the table, last
"$PY" - "$STEPS" <<'EOF'
import json, sys

def key_figure(step, path):
    try:
        d = json.load(open(path))
    except Exception:
        return "(no JSON)"
    if step == "env":
        m = d.get("machine", {})
        return f"{m.get('gpu', '?')}, torch {d.get('versions', {}).get('torch', '?')}"
    if step == "install":
        return f"{d.get('install_method')}; wheels: {' '.join(d.get('wheels', [])) or 'none'}"
    if step == "ort":
        o = d.get("ort", {})
        return f"CUDA provider {o.get('cuda_provider')} (providers: {o.get('providers')})"
    if d.get("log_tail"):
        return d["log_tail"][-1][:110]
    text = str(d.get("headline") or d.get("why") or d.get("error") or "").strip()
    return text.splitlines()[0][:110] if text else ""

rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print("\n==== GPU suite: steps")
print(f"{'step':<13} {'status':<16} {'s':>4}  key figure")
for step, status, secs, path in rows:
    print(f"{step:<13} {status:<16} {secs:>4}  {key_figure(step, path)}")
EOF
echo "total ${SECONDS}s; results in $OUT"
