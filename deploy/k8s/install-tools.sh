#!/usr/bin/env bash
# Installs the offline deploy validation tools into .reelbus/bin (git-ignored):
#   kustomize  (sigs.k8s.io/kustomize/kustomize/v5, from the Go module proxy)
#   kubeconform (github.com/yannh/kubeconform, from the Go module proxy)
#   the Kubernetes JSON schemas kubeconform validates against (PyPI kubernetes-validate, into .venv)
#   KEDA's ScaledObject validator (npm @kubernetes-models/keda, into .reelbus/node)
# Needs go, node/npm and the project's .venv (PYTHON= to use another interpreter).
# Idempotent: a tool already present at the pinned version is left alone. .ci/run can call it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${REELBUS_HOME:-$ROOT/.reelbus}/bin"
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.8.1}"
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-v0.8.0}"
mkdir -p "$BIN"
command -v go >/dev/null || { echo "install-tools.sh: needs Go (https://go.dev/dl/)" >&2; exit 1; }
export GOBIN="$BIN" CGO_ENABLED=0

if [ ! -x "$BIN/kustomize" ] || ! "$BIN/kustomize" version 2>/dev/null | grep -q "${KUSTOMIZE_VERSION}"; then
  go install "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
fi
if [ ! -x "$BIN/kubeconform" ] || ! "$BIN/kubeconform" -v 2>/dev/null | grep -q "${KUBECONFORM_VERSION#v}"; then
  go install -ldflags "-X main.version=${KUBECONFORM_VERSION#v}" "github.com/yannh/kubeconform/cmd/kubeconform@${KUBECONFORM_VERSION}"
fi

# Kubernetes JSON schemas for kubeconform, from the PyPI package kubernetes-validate (Apache-2.0). Its
# schemas point into one shared _definitions.json by an absolute ref that kubeconform cannot load, so
# each kind's schema is written out standalone (the definitions it reaches inlined under $defs), in
# kubeconform's layout: .reelbus/k8s-schemas/v<version>-standalone-strict/<kind>-<group>-<version>.json
K8S_VERSION="${K8S_SCHEMA_VERSION:-1.35.0}"
KV_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
"$PY" -c "import kubernetes_validate" 2>/dev/null || "$PY" -m pip install -q "kubernetes-validate==${KV_VERSION}"
SCHEMAS="${REELBUS_HOME:-$ROOT/.reelbus}/k8s-schemas"
"$PY" - "$SCHEMAS" "$K8S_VERSION" <<'PYEOF'
import json, pathlib, sys
import kubernetes_validate
dest, version = pathlib.Path(sys.argv[1]), sys.argv[2]
src = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
out = dest / f"v{version}-standalone-strict"
if (out / ".complete").exists():
    sys.exit(0)
out.mkdir(parents=True, exist_ok=True)
PREFIX = "/api/_definitions.json#/$defs/"
defs = json.loads((src / "_definitions.json").read_text())["$defs"]

def walk(node, found):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.removeprefix(PREFIX).removeprefix("#/$defs/")
            node["$ref"] = "#/$defs/" + name
            if name not in found:
                found.add(name)
                walk(defs[name], found)
        for value in node.values():
            walk(value, found)
    elif isinstance(node, list):
        for value in node:
            walk(value, found)

for name in defs:  # rewrite the refs inside the definitions once
    walk(defs[name], set())
count = 0
for path in sorted(src.glob("*.json")):
    if path.name.startswith("_") or path.name == "all.json":
        continue
    schema = json.loads(path.read_text())
    found: set = set()
    walk(schema, found)
    closure, todo = set(found), list(found)
    while todo:
        extra: set = set()
        walk(defs[todo.pop()], extra)
        for name in extra - closure:
            closure.add(name)
            todo.append(name)
    if closure:
        schema["$defs"] = {name: defs[name] for name in sorted(closure)}
    (out / path.name).write_text(json.dumps(schema))
    count += 1
(out / ".complete").write_text(f"kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}\n")
print(f"kubernetes schemas: {count} kinds of Kubernetes {version} in {out}")
PYEOF

# KEDA's ScaledObject is a CRD, absent from the Kubernetes schemas: the npm package
# @kubernetes-models/keda (MIT) ships validators generated from KEDA's CRD schemas; node runs them.
KEDA_MODELS_VERSION="${KEDA_MODELS_VERSION:-2.0.0}"
NODE_DIR="${REELBUS_HOME:-$ROOT/.reelbus}/node"
command -v node >/dev/null && command -v npm >/dev/null || { echo "install-tools.sh: needs node and npm" >&2; exit 1; }
if ! grep -qs "\"version\": \"${KEDA_MODELS_VERSION}\"" "$NODE_DIR/node_modules/@kubernetes-models/keda/package.json"; then
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" "@kubernetes-models/keda@${KEDA_MODELS_VERSION}"
fi
echo "@kubernetes-models/keda: ${KEDA_MODELS_VERSION} in $NODE_DIR"
echo "kustomize:   $("$BIN/kustomize" version)"
echo "kubeconform: $("$BIN/kubeconform" -v)"
