#!/usr/bin/env bash
# Fails if one dataset's preprocessing is hard-wired into product code: the Fashion-MNIST
# statistics (0.2860 / 0.3530, also written 0.286 / 0.353) or its reader `fashion_mnist(`.
# Every consumer takes mean/std, class names and augmentation from the dataset's input spec.
#
# The rule, per tracked Rust file:
# - test code is exempt: files under a `tests/` directory (and the `tests` crate), and
#   everything from a file's first `#[cfg(test)]` line on (unit-test modules sit at the end);
# - shared/core/src/data/idx.rs is exempt: the IDX reader documents and tests its own data;
# - benches/ and examples/ may use the numbers only in a file that reads Fashion-MNIST
#   explicitly (calls `fashion_mnist(`), where they describe that data;
# - everything else (src/ of every crate, build scripts) must contain none of them.
set -euo pipefail
cd "$(dirname "$0")/.."

pattern='0\.2860?([^0-9]|$)|0\.3530?([^0-9]|$)|fashion_mnist\('
status=0
while IFS= read -r f; do
  case "$f" in
    tests/*|*/tests/*|shared/core/src/data/idx.rs) continue ;;
  esac
  case "$f" in
    */benches/*|*/examples/*|benches/*|examples/*)
      if grep -q 'fashion_mnist(' "$f"; then continue; fi ;;
  esac
  hits=$(awk '/#\[cfg\(test\)\]/ { exit } { print FILENAME ":" FNR ": " $0 }' "$f" \
    | grep -E "$pattern" || true)
  if [ -n "$hits" ]; then
    echo "$hits"
    status=1
  fi
done < <(git ls-files '*.rs')

if [ "$status" -ne 0 ]; then
  echo "check-no-dataset-constants: Fashion-MNIST constants or reader in non-test code (above);" >&2
  echo "take them from the dataset's input spec instead (see the rule at the top of $0)." >&2
fi
exit "$status"
