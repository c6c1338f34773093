#!/usr/bin/env bash
# Install Detectron2 into a virtual environment (what `make setup` runs).
#
#   bash tools/install_detectron2.sh [PYTHON]     # default: .venv/bin/python
#
# Installs detectron2 into the venv whose python is PYTHON, unless it already imports
# (e.g. a user's own build from source). detectron2 is not on PyPI: we use the
# `sal-detectron2` redistribution (built for CPython 3.10; its pure-Python code runs
# on 3.11 and its compiled _C falls back cleanly), then its runtime dependencies.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
PY=${1:-.venv/bin/python}
if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "detectron2 already importable: $("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')"
  exit 0
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 \
  --target "$SITE" --upgrade "sal-detectron2==0.7.2"
"$PY" -m pip install -q Pillow matplotlib pycocotools termcolor yacs tabulate cloudpickle \
  tqdm tensorboard "numpy<2" "omegaconf>=2.1,<2.4" hydra-core packaging "fvcore>=0.1.5,<0.1.6" \
  iopath "setuptools<81"
"$PY" -c "import detectron2; print('detectron2', detectron2.__version__)"
