#!/usr/bin/env bash
# `make exercises-proof`: proves that every exercise's check can tell done
# from not done. Each check must fail on the code as it is, and pass once
# the GUIDE's own answer (exercises/answers/N.patch) is applied.
#
# The answers are applied in a scratch copy of the tracked files, never
# here, with a copy of target/debug, so each build recompiles only
# stopover itself. EXERCISES="1 3" limits the proof to some exercises.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
all=$(ls exercises/answers/*.patch | sed 's|.*/\([0-9]*\)\.patch|\1|' | sort -n | tr '\n' ' ')
only=${EXERCISES:-$all}
started=$(date +%s)

echo "== each check fails on the code as it is"
for n in $only; do
    if out=$(bash scripts/exercise.sh --exercise "$n"); then
        echo "exercise $n passes on unchanged code: its check cannot tell"; exit 1
    fi
    printf '%s\n' "$out" | head -n 1
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/stopover-proof.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$scratch"
if [ -d target/debug ]; then
    mkdir -p "$scratch/target"
    cp -a --reflink=auto target/debug "$scratch/target/"
fi
echo "== each check passes with its answer (scratch copy: $scratch, $(( $(date +%s) - started ))s so far)"
for n in $only; do
    (
        cd "$scratch"
        git apply "$root/exercises/answers/$n.patch"
        status=0
        out=$(CARGO_TARGET_DIR="$scratch/target" bash scripts/exercise.sh --exercise "$n") || status=$?
        git apply -R "$root/exercises/answers/$n.patch"
        printf '%s\n' "$out"
        if [ "$status" != 0 ]; then
            echo "exercise $n: the GUIDE's answer does not pass its check"; exit 1
        fi
    )
done
echo "== proof done in $(( $(date +%s) - started ))s"
