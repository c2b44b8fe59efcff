# Sourced by setup.sh and gpu_check.sh (from the repository root): pick_python sets $py to the
# interpreter janus_fast is installed in (or is to be) and $py_origin to why; it fails when
# there is none. The order: the active virtual environment, ./.venv made by setup.sh, python3,
# python.
pick_python() {
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    py="$VIRTUAL_ENV/bin/python"; py_origin="the active virtual environment"
  elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python; py_origin="./.venv made by scripts/setup.sh"
  else
    py="$(command -v python3 || command -v python || true)"; py_origin="the PATH"
  fi
  [ -n "$py" ]
}
