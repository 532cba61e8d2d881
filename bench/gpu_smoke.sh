#!/usr/bin/env bash
# The script a GPU host runs to prove kiln's whole GPU path on itself:
# build the demo recipe's FP8 variant (INT4-AWQ where this GPU has no FP8) for this host's SM,
# run the engine check against the unquantized model, publish, pull it back by SM, and print
# the build time and the accuracy table (CPU reference runtime next to the engine).
#
#   bench/gpu_smoke.sh                 # in kiln's checkout, after `make venv`
#   KILN_TRTLLM_PYTHON=/usr/bin/python3 bench/gpu_smoke.sh   # TensorRT-LLM in another Python (see compile/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
KILN=${KILN:-.venv/bin/kiln}
export KILN_HOME=${KILN_HOME:-$PWD/build/gpu-smoke-home}
mkdir -p build

$KILN doctor
SM=$($KILN doctor --json | $PY -c 'import json, sys; print(next((g["sm"] for g in json.load(sys.stdin)["host"]["gpus"]), ""))')
if [ -z "$SM" ]; then
    echo "gpu_smoke: no NVIDIA GPU found on this host (see the table above)" >&2
    exit 2
fi

$PY -m tests.testmodel build/demo-model
# One variant of the demo recipe, for this SM only.
VARIANT=$($PY - "$SM" <<'EOF'
import sys
from pathlib import Path

import yaml

from kiln.compile import support_problem

sm = sys.argv[1]
recipe = yaml.safe_load(Path("recipes/demo.yaml").read_text())
name = "fp8" if support_problem(*(lambda v: (v["quant"], v.get("kv_cache", "none")))(recipe["variants"]["fp8"]), sm) is None else "int4-awq"
variant = dict(recipe["variants"][name], gpus=[sm])
recipe.update(name="gpu-smoke", variants={name: variant})
recipe["model"]["source"] = str(Path("build/demo-model").resolve())
Path("build/gpu-smoke.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
print(name)
EOF
)

started=$(date +%s)
set +e
$KILN build build/gpu-smoke.yaml --gpu "$SM" --json > build/gpu-smoke.json
status=$?
set -e
echo "kiln build: exit $status after $(( $(date +%s) - started )) s (includes quantize, CPU validation and upload)"

rm -rf build/gpu-smoke-pulled
$KILN pull "gpu-smoke-$VARIANT@candidate" --gpu "$SM" --out build/gpu-smoke-pulled || true

$PY - "$SM" <<'EOF'
import json
import sys
from pathlib import Path

sm = sys.argv[1]
build = json.loads(Path("build/gpu-smoke.json").read_text())
engine_json = Path("build/gpu-smoke-pulled/engines") / sm / "engine.json"
record = json.loads(engine_json.read_text()) if engine_json.is_file() else {}
print(f"\nhost SM {sm}: {record.get('gpu', '?')}, TensorRT {record.get('tensorrt')}, TensorRT-LLM {record.get('tensorrt_llm')}")
print(f"engine build: {record.get('build_seconds', '?')} s  ({' '.join(record.get('command', [])[:1])})\n")
print(f"{'variant':<10} {'where':<18} {'ppl change %':>12} {'KL':>9} {'top-1':>7}  gate")
for v in build["variants"]:
    rows = [("CPU reference", v["metrics"], v["gate"])]
    rows += [(f"engine {e['sm']}", e["metrics"], e["gate"]) for e in v["engines"] if e["metrics"]]
    rows += [(f"engine {e['sm']}", None, {"passed": False, "failures": [e["status"]]}) for e in v["engines"] if not e["metrics"]]
    for where, m, gate in rows:
        if m is None:
            print(f"{v['variant']:<10} {where:<18} {'-':>12} {'-':>9} {'-':>7}  {gate['failures'][0]}")
            continue
        verdict = "pass" if gate["passed"] else "FAIL " + "; ".join(gate["failures"])
        print(f"{v['variant']:<10} {where:<18} {m['ppl_increase_pct']:>+12.3f} {m['mean_kl']:>9.5f} {m['top1_agreement']:>7.4f}  {verdict}")
EOF
exit $status
