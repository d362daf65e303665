#!/usr/bin/env bash
# Re-vendors (or, with --check, verifies) the dashboard's third-party files
# from the npm registry. Not a build step: the files are committed, and the
# binary embeds them as they are. Run it to upgrade a package (change its
# version below, then update its VERSION file) or to prove that the committed
# copies are the registry's bytes.
#
#   server/ui/vendor/update.sh           # copy the files of the pinned versions here
#   server/ui/vendor/update.sh --check   # exit 1 if a committed file differs from its tarball
set -euo pipefail

PREACT=10.29.8
HTM=3.1.1
DAGRE=3.1.3
GRAPHLIB=4.0.6
UPLOT=1.6.32

here=$(cd "$(dirname "$0")" && pwd)
check=false
[[ ${1:-} == --check ]] && check=true
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# npm pack checks each tarball against the registry's integrity hash.
fetch() { # package version -> directory of the unpacked tarball
  local dir="$tmp/$(echo "$1" | tr '/@' '__')"
  mkdir -p "$dir"
  (cd "$dir" && npm pack --silent "$1@$2" >/dev/null && tar -xzf ./*.tgz)
  echo "$dir/package"
}

status=0
put() { # source destination
  if $check; then
    if ! cmp -s "$1" "$here/$2"; then
      echo "differs from the registry's copy: $2" >&2
      status=1
    fi
  else
    mkdir -p "$(dirname "$here/$2")"
    cp "$1" "$here/$2"
  fi
}

p=$(fetch preact "$PREACT")
put "$p/dist/preact.umd.js" preact/preact.umd.js
put "$p/hooks/dist/hooks.umd.js" preact/hooks.umd.js
put "$p/LICENSE" preact/LICENSE

p=$(fetch htm "$HTM")
put "$p/dist/htm.module.js" htm/htm.module.js
put "$p/LICENSE" htm/LICENSE

p=$(fetch @dagrejs/dagre "$DAGRE")
put "$p/dist/dagre.esm.js" dagre/dagre.esm.js
put "$p/LICENSE" dagre/LICENSE
p=$(fetch @dagrejs/graphlib "$GRAPHLIB")
put "$p/LICENSE" dagre/LICENSE.graphlib

p=$(fetch uplot "$UPLOT")
put "$p/dist/uPlot.esm.js" uplot/uPlot.esm.js
put "$p/dist/uPlot.min.css" uplot/uPlot.min.css
put "$p/LICENSE" uplot/LICENSE

if $check; then
  [[ $status == 0 ]] && echo "vendored files match preact $PREACT, htm $HTM, @dagrejs/dagre $DAGRE, uplot $UPLOT"
  exit $status
fi
echo "vendored preact $PREACT, htm $HTM, @dagrejs/dagre $DAGRE (graphlib $GRAPHLIB), uplot $UPLOT; update the VERSION files"
