#!/usr/bin/env bash
# The fixtures in testdata/ (testdata/README.md) are exactly what testdata/SHA256SUMS names: every
# listed file has its checksum, and every file there is listed (but SHA256SUMS itself, README.md
# and .gitattributes).
#
#   tests/testdata/checksums_test.sh TESTDATA_DIR
set -euo pipefail
cd "$1"
sha256sum --strict --quiet -c SHA256SUMS
listed=$(sed -E 's/^[0-9a-f]{64}  //' SHA256SUMS | sort)
present=$(find . -type f ! -path ./SHA256SUMS ! -path ./README.md ! -path ./.gitattributes |
  sed 's#^\./##' | sort)
if [ "$listed" != "$present" ]; then
  echo "testdata/SHA256SUMS does not name exactly the files in testdata/ (< listed, > present):"
  diff <(echo "$listed") <(echo "$present") || true
  exit 1
fi
echo "testdata: $(echo "$listed" | wc -l) files, every SHA-256 matches SHA256SUMS"
