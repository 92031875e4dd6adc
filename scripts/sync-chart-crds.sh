#!/usr/bin/env bash
# Copy the generated CRDs (crds/*.yaml, written by `valve crds generate`) into the chart's crds/ folder.
# tests/test_chart.py fails when the two differ.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rm -f "$ROOT"/charts/valve/crds/*.yaml
cp "$ROOT"/crds/*.yaml "$ROOT"/charts/valve/crds/
ls "$ROOT"/charts/valve/crds/
