# Source from the repository root (`. scripts/activate.sh`): activates the ./.venv that
# scripts/setup.sh made on an externally managed Python; does nothing where it made none.
if [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
