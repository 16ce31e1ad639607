#!/usr/bin/env bash
# Check that a fix's tests fail without the fix: for each COMMIT, its parent checked out in a temporary git
# worktree with the COMMIT's tests/ copied in; the tests the commit added (by name, slow ones included)
# and the fast tests of the test files it touched run there, and what fails is listed.
#   bash scripts/tests_fail_before.sh COMMIT [COMMIT...]
# A test that passes there does not show the fault it was written for. Needs git and the dev install.
set -uo pipefail
case ${1:-} in  # --help: the comment above
  -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
esac
if [ $# -lt 1 ]; then
  echo "usage: tests_fail_before.sh COMMIT [COMMIT...]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
for commit in "$@"; do
  where=$(mktemp -d)
  git -C "$root" worktree add -f --detach "$where" "$commit^" >/dev/null
  git -C "$where" checkout "$commit" -- tests/
  names=$(git -C "$root" diff "$commit^" "$commit" -- tests/ | sed -nE 's/^\+def (test_[A-Za-z0-9_]+).*/\1/p' \
          | sort -u | paste -sd' ' | sed 's/ / or /g')
  files=$(git -C "$root" diff --name-only "$commit^" "$commit" -- tests/ | grep '/test_' | tr '\n' ' ')
  echo "== $commit $(git -C "$root" log -1 --format=%s "$commit" | cut -c1-100)"
  if [ -n "$names" ]; then
    echo "   tests it added: $names"
    (cd "$where" && PYTHONPATH=$where python -m pytest -q -p no:cacheprovider tests -k "$names" 2>&1 \
      | grep -E "^(FAILED|ERROR)|passed|failed" | sed 's/^/   /')
  fi
  if [ -n "$files" ]; then
    echo "   fast tests of $files"
    (cd "$where" && PYTHONPATH=$where python -m pytest -q -p no:cacheprovider -m "not slow" $files 2>&1 \
      | grep -E "^(FAILED|ERROR)|passed|failed" | sed 's/^/   /')
  fi
  # Without the fix a test may leave processes behind (a sweep's workers after SIGTERM): stop those that
  # still run this worktree's code.
  for proc in /proc/[0-9]*; do
    if { tr '\0' '\n' < "$proc/environ"; } 2>/dev/null | grep -qx "PYTHONPATH=$where"; then
      kill -9 "${proc#/proc/}" 2>/dev/null
    fi
  done
  git -C "$root" worktree remove --force "$where"
done
