#!/usr/bin/env bash
# Checks the one-way layering of src/ (docs/architecture.md, "Checking the
# layering"): a layer may import from the layers below it, never from one above
# it or beside it. Prints every offending `use` line and exits 1 if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
# Bottom to top. backoff and http are leaves every layer may use; tcc uses only the store.
order=(store projection command outbox flow)
allowed() { # allowed <from> <to>
  local from=$1 to=$2 i j
  [[ $to == backoff || $to == http || $from == "$to" ]] && return 0
  [[ $from == tcc ]] && { [[ $to == store ]]; return; }
  [[ $to == tcc ]] && return 1
  for i in "${!order[@]}"; do [[ ${order[$i]} == "$from" ]] && break; done
  for j in "${!order[@]}"; do [[ ${order[$j]} == "$to" ]] && break; done
  (( j < i ))
}
bad=0
for dir in store projection command outbox flow tcc; do
  while IFS= read -r line; do
    to=$(sed -E 's/.*crate::([a-z_]+).*/\1/' <<<"${line#*:*:}")
    if ! allowed "$dir" "$to"; then echo "upward or sideways: $line"; bad=1; fi
  done < <(grep -rnE "crate::[a-z_]+::" "src/$dir" --include=*.rs | grep -vE "^\S+:\s*//" || true)
done
for leaf in backoff http; do
  if grep -nE "use crate::" "src/$leaf.rs"; then echo "leaf module $leaf imports a layer"; bad=1; fi
done
exit $bad
