# Sourced by the set-up scripts: PY is $PYTHON, or the first of python3.11, 3.12, 3.10, python3 found.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
