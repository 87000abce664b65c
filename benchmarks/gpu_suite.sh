#!/usr/bin/env bash
# Every GPU-only check and benchmark of vesper-sdk, for a lent H100/H200, in under 7 minutes.
#
#   here, once:  ./benchmarks/fetch_gpu_wheels.sh          # bitsandbytes into .whl/
#   device run:  carry [".whl"], command "bash benchmarks/gpu_suite.sh", timeout_s 450
#   elsewhere:   bash benchmarks/gpu_suite.sh   (any CUDA machine; OUT: /tmp/vesper-gpu-results)
#   some steps:  GPU_SUITE_STEPS=kernels,decode,generate bash benchmarks/gpu_suite.sh
#
# Steps (each under `timeout`, each recorded; a failure never stops the later steps):
#   1 env          nvidia-smi, python/torch/triton/... versions              -> env.json
#   2 install      carried wheels (.whl/) into /tmp/site; vesper_sdk made importable
#                  with its package-dir mapping (see below)                    -> env.json
#   3 kernels      benchmarks/gpu_checks.py: the compiled Velvet kernel vs its torch
#                  reference (fp32/bf16/fp16, ragged layouts, a 50 M-element buffer) and
#                  VelvetOptimizer vs torch AdamW on CUDA                     -> kernels.json
#                  (The kernel's pytest module runs interpreted CPU tensors by design, so
#                  it adds nothing here: `make test` runs it everywhere.)
#     decode       gpu_checks.py --checks decode: CUDA-graph / compiled decode steps vs the
#                  model's own forward (same greedy tokens), tokens/s of each -> decode.json
#     decode_profile  benchmarks/decode_profile.py: step vs loop time, top CUDA kernels
#                  (log in bundle.tar.gz)
#   4 optimizer    benchmarks/optimizer.py --preset medium --device cuda     -> optimizer.json
#   5 generate     benchmarks/generate.py --device cuda (graph/compiled decode vs HF)
#                                                                             -> generate.json
#     generate_plain  the same at batch 1, beside ours without the FFN pair and the
#                  pipelined loop (--plain)                 (generate-plain.json in the bundle)
#   6 bnb          bitsandbytes int8/nf4 quantize + reload + generate on the GPU -> bnb.json
#     serve_load   benchmarks/serve_load.py through the suite: vesper serve under Poisson
#                  load at 0.3x/1x/2x capacity, continuous vs static scheduler, 'small'
#                  shape and demo model; about 60 s (2 s of arrivals per point)
#                                          (serve_load.json/.png in the bundle: $OUT is full)
#   7 train_step   benchmarks/train_step.py, medium, B=8, S=1024 (bf16, compile, SDPA):
#                  ours (chunked head), ours with the full logits, and the
#                  seed-style; last, as its compile takes what the budget has left
#                                                                           -> train_step.json
#   8 ort          ONNX Runtime CUDA provider: reported, "absent" in the image -> env.json
# Steps 4, 5, 7 and serve_load go through benchmarks/suite.py (its cuda-sized arguments), so
# their JSON carries the command, machine, versions and date like every other result.
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
BUDGET_S="${GPU_SUITE_BUDGET_S:-400}"   # under 7 minutes: a rerun must still fit 15 of device time
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

# GPU_SUITE_STEPS=decode,generate runs only those steps (env, install, ort always run):
# a rerun after a fix need not pay again for what already passed.
wanted_step() { [ -z "${GPU_SUITE_STEPS:-}" ] || [[ ",$GPU_SUITE_STEPS," == *",$1,"* ]]; }

# run_step NAME WANTED_S JSON CMD...  -- run CMD under timeout, log it, record the outcome
run_step() {
    local name=$1 wanted=$2 json=$3
    shift 3
    wanted_step "$name" || return 0
    local limit
    limit=$(limit_for "$wanted")
    if [ "$limit" -lt 15 ]; then
        note "$name: skipped, the suite budget is spent"
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
open(dst, "w").write(f"""import importlib.machinery, importlib.util, os, sys
MAPPING = {mapping!r}
class _VesperFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = MAPPING.get(name)
        if folder is None:
            return None
        if not os.path.exists(folder + "/__init__.py"):  # kernels/, export/, ...: namespaces
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [folder]
            return spec
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
vesper_sdk.training.optim; print('vesper_sdk from', vesper_sdk.__file__)") >>"$WORK/logs/install.log" 2>&1
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
run_step kernels 70 "$OUT/kernels.json" \
    "$PY" benchmarks/gpu_checks.py --checks kernel,optimizer --device cuda \
    --json "$OUT/kernels.json"

# The same checks as pytest tests (tests/gpu/, skipped on machines without CUDA): pass/fail
# in the suite's table, the log in the bundle.
run_step gpu_tests 240 "$WORK/logs/gpu_tests.json" \
    "$PY" -m pytest -q -p no:cacheprovider tests/gpu

# The CUDA decode paths (graph + compile, graph, compile, eager) against the model's own
# forward: same greedy tokens, and each one's tokens/s at batch 1.
run_step decode 150 "$OUT/decode.json" \
    "$PY" benchmarks/gpu_checks.py --checks decode --device cuda --json "$OUT/decode.json"

# Where a decoded token's time goes (step vs loop, top kernels): its log is in the bundle
# ($OUT holds at most 8 files, so its record stays there too).
run_step decode_profile 60 "$WORK/logs/decode_profile.json" \
    "$PY" benchmarks/decode_profile.py --device cuda --torch-profile

# ------------------------------------------------- 4, 5, 7 benchmarks (suite)
bench_step() {  # bench_step NAME WANTED_S: one benchmark through the suite, cuda sizes
    local name=$1 limit
    wanted_step "$name" || return 0
    limit=$(limit_for "$2")
    # The suite stops the benchmark itself 10 s before `timeout` would, so a slow
    # benchmark is still recorded (status timeout) with its command and output.
    run_step "$name" "$limit" "$OUT/$name.json" \
        "$PY" benchmarks/suite.py --only "$name" --device cuda --out-dir "$WORK/results" \
        --no-charts --timeout $((limit > 25 ? limit - 10 : 15))
    cp -f "$WORK/results/$name.json" "$OUT/$name.json" 2>/dev/null || true
}
# Cheapest and most asked-for first; the compile-heavy train step takes what is left.
bench_step optimizer 60
bench_step generate 100

# What the CUDA defaults (FFN pair, loop a step ahead) give: ours with and without them
# and HF in one run, batch 1; the JSON goes in the bundle.
run_step generate_plain 70 "$WORK/results/generate-plain.json" \
    "$PY" benchmarks/generate.py --device cuda --batch-sizes 1 --plain \
    --json "$WORK/results/generate-plain.json"

# ---------------------------------------------------------------------------- 6 bnb
if ! wanted_step bnb; then
    :
elif "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
    run_step bnb 45 "$OUT/bnb.json" \
        "$PY" benchmarks/gpu_checks.py --checks bnb --device cuda --json "$OUT/bnb.json"
else
    why="bitsandbytes is not in the image and no .whl/ was carried"
    why="$why (run benchmarks/fetch_gpu_wheels.sh first, and carry .whl)"
    printf '{"status": "absent", "why": "%s"}\n' "$why" >"$OUT/bnb.json"
    record bnb "absent(no wheel)" 0 "$OUT/bnb.json"
fi

# vesper serve under load (continuous vs static scheduler): through the suite like the
# benchmarks above, but its JSON and PNG stay in the bundle ($OUT already holds 8 files).
if wanted_step serve_load; then
    limit=$(limit_for 80)
    run_step serve_load "$limit" "$WORK/results/serve_load.json" \
        "$PY" benchmarks/suite.py --only serve_load --device cuda --out-dir "$WORK/results" \
        --no-charts --timeout $((limit > 25 ? limit - 10 : 15))
fi

bench_step train_step 200

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
    if step == "generate_plain" and d.get("rows"):
        r = d["rows"][0]
        return (f"batch 1: default {r['vesper']['tok_s_best']:.0f} tok/s "
                f"({r.get('ratio_best', 0):.2f}x HF), without pair+pipeline "
                f"{r['vesper-plain']['tok_s_best']:.0f} "
                f"({r.get('ratio_plain_best', 0):.2f}x HF)")
    text = str(d.get("headline") or d.get("why") or d.get("error") or "").strip()
    return text.splitlines()[0][:110] if text else ""

rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print("\n==== GPU suite: steps")
print(f"{'step':<13} {'status':<16} {'s':>4}  key figure")
for step, status, secs, path in rows:
    print(f"{step:<13} {status:<16} {secs:>4}  {key_figure(step, path)}")
EOF
echo "total ${SECONDS}s; results in $OUT"
