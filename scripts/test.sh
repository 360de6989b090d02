#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the CPU test suite, one worker per core (at most 4).
source "$(dirname "$0")/env.sh"
exec python -m pytest -q --numprocesses auto --maxprocesses 4 "$@" tests
