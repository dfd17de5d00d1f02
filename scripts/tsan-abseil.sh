#!/usr/bin/env bash
# Builds the installed libabsl-dev's own Debian source (same version, same Debian patches, so the
# same ABI and sonames) as shared libraries instrumented with ThreadSanitizer, into a cache
# outside the checkout, and prints the directory that holds them. The TSan build links with an
# RPATH to it (CACHEMGR_TSAN_ABSEIL_DIR, cmake/sanitizers.cmake), so the dynamic loader resolves
# every absl library there, for our code and for gRPC's alike: one instrumented absl::Mutex in
# the process, whose happens-before edges TSan sees. docs/RELIABILITY.md says why.
#
# One patch is applied, an annotation only (scripts/abseil-tsan.patch): without it TSan reports
# a race inside absl::Mutex itself (Waiter::Post on a waking thread's semaphore, abseil-cpp
# issues #760 and #1239), which current upstream abseil silences the same way.
#
# Builds absl synchronization and what it links, and keeps the synchronizing libraries (below);
# about 1-3 minutes on 2 cores. Needs apt's deb-src entry for Debian main (added here if missing, as root or with
# sudo) and dpkg-source (dpkg-dev, part of build-essential).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
patch_file=$here/abseil-tsan.patch
version=$(dpkg-query -W -f='${Version}' libabsl-dev)
# A new cache entry whenever this script or the patch changes.
recipe=$(cat "$here/tsan-abseil.sh" "$patch_file" | sha256sum | cut -c1-8)
cache=${CACHEMGR_TSAN_ABSEIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cachemgr}/abseil-tsan-$version-$recipe
if [ -f "$cache/complete" ]; then
  echo "$cache/lib"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! apt-cache showsrc abseil 2>/dev/null | grep -qx "Version: $version"; then
  echo "adding the Debian source index (deb-src) to apt" >&2
  $SUDO tee /etc/apt/sources.list.d/cachemgr-debian-src.sources >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  $SUDO apt-get update -qq >&2
fi
work=$(mktemp -d /tmp/cachemgr-abseil-XXXXXX)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get source -qq "abseil=$version" >&2)
source_dir=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'abseil-*')
patch -d "$source_dir" -p1 --quiet <"$patch_file"
# Debian's own configuration (debian/rules: C++17, shared, no NDEBUG), plus TSan.
cmake -S "$source_dir" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=None \
  -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_CXX_FLAGS="-g -O1 -fsanitize=thread" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=thread" >/dev/null
cmake --build "$work/build" -j"$(nproc)" --target synchronization >&2
rm -rf "$cache"
mkdir -p "$cache/lib"
# Only the libraries that synchronize (Mutex, CondVar, Notification; the spinlocks, thread
# identities and arenas under them). The other absl libraries stay Debian's: gRPC calls them on
# its own objects, which it hands between threads invisibly to TSan, so their accesses must count
# as uninstrumented (ignore_noninstrumented_modules, tests/CMakeLists.txt).
for lib in synchronization graphcycles_internal base spinlock_wait malloc_internal; do
  find "$work/build" -name "libabsl_$lib.so.*" -exec cp -P {} "$cache/lib/" \;
done
touch "$cache/complete"
echo "$cache/lib"
