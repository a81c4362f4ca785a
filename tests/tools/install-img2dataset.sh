#!/usr/bin/env bash
# Installs img2dataset, the tool that writes real pools, into its own virtual environment
# (.venv-img2dataset at the repository root) for tests/test_real_pools.py.
#
# It cannot share selbench's environment: img2dataset 1.47 pins pandas<3 (selbench uses
# pandas 3) and pulls in opencv, albumentations and wandb. The test runs its command line
# from this environment instead. Idempotent: does nothing when the tool is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.venv-img2dataset
version=1.47.0
if "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('img2dataset') == '$version'" 2>/dev/null; then
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "img2dataset==$version"
echo "img2dataset $version installed in $venv"
