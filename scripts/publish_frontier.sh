#!/usr/bin/env bash
# Copy a frontier study's result files (not its models) into results/frontier and rewrite its report there:
#   bash scripts/publish_frontier.sh OUT [mea study frontier flags naming the systems to report]
set -euo pipefail
out=$1; shift
mkdir -p results/frontier/systems
cp "$out"/systems/*.json results/frontier/systems/
${MEA:-mea} study frontier results/frontier --report-only "$@" > /dev/null
