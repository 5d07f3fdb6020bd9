#!/usr/bin/env bash
# What the OHIF checks need, under tests/ohif (ignored by git; .ci/run calls this, and so can you):
# - node_modules/: @cornerstonejs/adapters, core and tools 5.6.8 and dcmjs 0.52.0, the versions OHIF Viewer
#   3.13.2 bundles, exactly as package-lock.json pins them (npm ci), for check_sr.mjs
#   (tests/hospital/test_dicom_results.py, tests/hospital/test_enhanced_results.py);
# - app/: OHIF Viewer 3.13.2's prebuilt app, the dist/ folder of npm's @ohif/app, its tarball checked against
#   the registry's integrity pinned below (tests/hospital/test_ohif.py serves it with nginx).
# Both are kept when already there (the same lock file, the same version).
set -euo pipefail
cd "$(dirname "$0")"
OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==

if ! cmp -s package-lock.json node_modules/.pedetect-lock.json; then
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.pedetect-lock.json
fi

if [ "$(cat app/.ohif-version 2>/dev/null || true)" != "$OHIF_VERSION" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack "@ohif/app@$OHIF_VERSION" --loglevel=error >/dev/null)
    tarball="$work/ohif-app-$OHIF_VERSION.tgz"
    got="sha512-$(python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")"
    if [ "$got" != "$OHIF_INTEGRITY" ]; then
        echo "@ohif/app@$OHIF_VERSION: integrity $got, expected $OHIF_INTEGRITY" >&2
        exit 1
    fi
    rm -rf app.new
    mkdir app.new
    tar -xzf "$tarball" -C app.new --strip-components=2 package/dist
    echo "$OHIF_VERSION" > app.new/.ohif-version
    rm -rf app
    mv app.new app
fi
