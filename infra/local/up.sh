#!/usr/bin/env bash
# Start the local cluster (Ray head + a second Ray node, MLflow server, moto S3 server; all on this machine) and
# print the environment the jobs read:
#   eval "$(infra/local/up.sh)"                       # defaults: work/local-cluster, the tools' usual ports
#   eval "$(infra/local/up.sh --free-ports --bucket raw --bucket shards --artifacts s3)"
# Idempotent: what is running is kept. Options: python -m infra.local.cluster --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
exec "${PYTHON:-$root/.venv/bin/python}" -m infra.local.cluster up "$@"
