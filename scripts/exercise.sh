#!/usr/bin/env bash
# The GUIDE's exercises (exercises/main.rs): `make exercises` runs
# `exercise.sh --status`, `make exercise N` runs `exercise.sh --exercise N`.
# Builds the checks with the learner's code (compile errors are shown as
# they are), then runs the check binary itself, so its verdict is not
# buried under cargo's own "test failed" lines.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! out=$(${CARGO:-cargo} test --no-run --test exercises 2>&1); then
    printf '%s\n' "$out" >&2
    echo "exercises: the code does not build yet: fix the errors above first" >&2
    exit 1
fi
exe=$(printf '%s\n' "$out" | sed -n 's|.*Executable exercises/main.rs (\(.*\))$|\1|p' | tail -n 1)
[ -n "$exe" ] || { printf '%s\n' "$out" >&2; echo "exercises: no check binary in cargo's output" >&2; exit 1; }
exec "$exe" "$@"
