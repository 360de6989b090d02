#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the CPU test suite.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@" tests
