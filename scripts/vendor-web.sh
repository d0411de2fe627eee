#!/usr/bin/env bash
# Third-party front-end assets for the operator console, vendored under vendor/web/ (the folder
# the binary embeds): fetched from the npm registry at the exact versions pinned below, each
# tarball checked against its pinned SHA-256 before anything is taken out of it.
#
#   scripts/vendor-web.sh [check]   (default) exit 0 at once when every pinned file is listed in
#                                   vendor/web/MANIFEST.tsv at its pinned version and its SHA-256
#                                   matches; otherwise fetch the packages that are missing, stale
#                                   or changed, and rewrite the manifest
#   scripts/vendor-web.sh fetch     fetch every package again
#
# The committed MANIFEST.tsv (package, version, tarball_sha256, path, sha256, licence; paths
# relative to vendor/web/) is what `check` verifies the files against. Needs curl, tar and
# sha256sum only: no node, no npm. Idempotent: a second run changes nothing.
#
# To update a package: change its version and tarball SHA-256 in PACKAGES (and its files in FILES
# if they moved), run `scripts/vendor-web.sh fetch`, read the diff and commit. The SHA-256 of a
# new tarball is printed by a fetch that fails on the old pin; check it against the registry's
# `dist.integrity` (sha512) for that version before pinning it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/vendor/web"
MANIFEST="$DEST/MANIFEST.tsv"
REGISTRY="${NPM_REGISTRY:-https://registry.npmjs.org}"
REGISTRY="${REGISTRY%/}"

# npm package | exact version | SHA-256 of the registry tarball | licence (SPDX id, licence file
# under vendor/web/). The registry's sha512 integrity of each tarball is in the comment above it.
PACKAGES=(
    # sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==
    "htmx.org|2.0.11|165a2655073e9e6e55e307a7c74e8ebcdb76afb7701f9c16cfd106a13add408e|0BSD htmx/LICENSE"
    # The tarball has a LICENSE (0BSD) but its package.json has no `license` field.
    # sha512-LJmxVhykyflBWgh5PvbRidcyuqMHlgfajmmzumvKctv9puvsufeH6OaejSMZTNTnEI8O2wXXn4ZZtBdpEMqmEQ==
    "htmx-ext-sse|2.2.4|90b46f5ab915ba2f64e6348448c8dba509277a47e15c125ffb65754eb4f6b5dc|0BSD htmx/LICENSE.htmx-ext-sse (package.json declares none; from the tarball's LICENSE)"
    # sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==
    "uplot|1.6.32|4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d|MIT uplot/LICENSE"
    # sha512-kIDugA7Ps4U+2BHxiNHmvgPIQDWPDU4IeU6TNRdvXQM1uZX+FibqDQT2xUOnnO2yq/LUHcwnGlu1hvf4KfXnMg==
    "@picocss/pico|2.1.1|4affbb56f49df6d5325610b06762156f1dcdbc6ef57cea5c136d7e8a00a8cd24|MIT pico/LICENSE.md"
    # sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ==
    "swagger-ui-dist|5.35.0|1b8e891893404ea4c3558b6a87e2a3e494e7eedba41168c2ece5800a391a6ea6|Apache-2.0 swagger-ui/LICENSE"
)

# npm package | path inside the tarball (under package/) | path under vendor/web/
FILES=(
    "htmx.org|dist/htmx.min.js|htmx/htmx.min.js"
    "htmx.org|LICENSE|htmx/LICENSE"
    "htmx-ext-sse|dist/sse.js|htmx/sse.js"
    "htmx-ext-sse|LICENSE|htmx/LICENSE.htmx-ext-sse"
    "uplot|dist/uPlot.iife.min.js|uplot/uPlot.iife.min.js"
    "uplot|dist/uPlot.min.css|uplot/uPlot.min.css"
    "uplot|LICENSE|uplot/LICENSE"
    "@picocss/pico|css/pico.min.css|pico/pico.min.css"
    "@picocss/pico|LICENSE.md|pico/LICENSE.md"
    "swagger-ui-dist|swagger-ui-bundle.js|swagger-ui/swagger-ui-bundle.js"
    "swagger-ui-dist|swagger-ui.css|swagger-ui/swagger-ui.css"
    "swagger-ui-dist|LICENSE|swagger-ui/LICENSE"
    "swagger-ui-dist|NOTICE|swagger-ui/NOTICE"
    # The licences of the libraries bundled into swagger-ui-bundle.js.
    "swagger-ui-dist|swagger-ui-bundle.js.LICENSE.txt|swagger-ui/swagger-ui-bundle.js.LICENSE.txt"
)

# Files in vendor/web/ that are not fetched: they are never removed nor reported as stray.
OWN_FILES=(README.md MANIFEST.tsv)

MANIFEST_HEADER=$'package\tversion\ttarball_sha256\tpath\tsha256\tlicence'

die() {
    echo "vendor-web: error: $*" >&2
    exit 1
}

for tool in curl tar sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is needed and is not installed"
done

mode=${1:-check}
case $mode in
    check | fetch) ;;
    *)
        echo "usage: scripts/vendor-web.sh [check|fetch]" >&2
        exit 2
        ;;
esac

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# The committed manifest, by path: M_PKG, M_VER, M_TGZ, M_SHA, M_LIC.
declare -A M_PKG=() M_VER=() M_TGZ=() M_SHA=() M_LIC=()
if [[ -f $MANIFEST ]]; then
    while IFS=$'\t' read -r pkg ver tgz path sha lic; do
        [[ $pkg == package || -z $pkg ]] && continue
        M_PKG[$path]=$pkg M_VER[$path]=$ver M_TGZ[$path]=$tgz M_SHA[$path]=$sha M_LIC[$path]=$lic
    done <"$MANIFEST"
fi

# pkg_files PKG: prints "SRC|DEST" for each of PKG's files.
pkg_files() {
    local entry
    for entry in "${FILES[@]}"; do
        [[ ${entry%%|*} == "$1" ]] && echo "${entry#*|}"
    done
    return 0
}

# up_to_date PKG VERSION TARBALL_SHA256: whether the manifest lists exactly PKG's pinned files at
# this version and tarball, and each file on disk has the listed SHA-256.
up_to_date() {
    local pkg=$1 ver=$2 tgz=$3 entry dest path n=0
    while IFS= read -r entry; do
        dest=${entry#*|}
        n=$((n + 1))
        [[ ${M_PKG[$dest]:-} == "$pkg" && ${M_VER[$dest]} == "$ver" && ${M_TGZ[$dest]} == "$tgz" ]] || return 1
        [[ -f $DEST/$dest && $(sha256 "$DEST/$dest") == "${M_SHA[$dest]}" ]] || return 1
    done < <(pkg_files "$pkg")
    for path in "${!M_PKG[@]}"; do
        [[ ${M_PKG[$path]} == "$pkg" ]] && n=$((n - 1))
    done
    ((n == 0))
}

# forget PKG: removes the files the manifest lists for PKG (from an older pin) and their rows.
forget() {
    local path
    for path in "${!M_PKG[@]}"; do
        if [[ ${M_PKG[$path]} == "$1" ]]; then
            rm -f "$DEST/$path"
            unset "M_PKG[$path]" "M_VER[$path]" "M_TGZ[$path]" "M_SHA[$path]" "M_LIC[$path]"
        fi
    done
}

# fetch PKG VERSION TARBALL_SHA256 LICENCE: downloads the tarball, checks it against the pin,
# extracts PKG's files into vendor/web/ and lists them in the manifest.
fetch() {
    local pkg=$1 ver=$2 pin=$3 lic=$4
    local url="$REGISTRY/$pkg/-/${pkg##*/}-$ver.tgz"
    local tgz="$TMP/${pkg//\//_}-$ver.tgz" out="$TMP/${pkg//\//_}-$ver" got entry src dest
    echo "vendor-web: fetching $pkg $ver"
    curl -fsSL --retry 3 --connect-timeout 20 -o "$tgz" "$url" || die "$pkg $ver: download failed ($url)"
    got=$(sha256 "$tgz")
    if [[ $got != "$pin" ]]; then
        die "$pkg $ver: tarball SHA-256 mismatch: pinned $pin, downloaded $got ($url);" \
            "nothing was extracted. If the version was changed on purpose, check the new tarball" \
            "against the registry's integrity and pin its SHA-256 in scripts/vendor-web.sh"
    fi
    mkdir -p "$out"
    local members=()
    while IFS= read -r entry; do members+=("package/${entry%%|*}"); done < <(pkg_files "$pkg")
    tar -xzf "$tgz" -C "$out" --no-same-owner "${members[@]}" ||
        die "$pkg $ver: the tarball lacks a pinned file (wanted: ${members[*]#package/})"
    forget "$pkg"
    while IFS= read -r entry; do
        src=${entry%%|*} dest=${entry#*|}
        [[ -f $out/package/$src ]] || die "$pkg $ver: package/$src is not a regular file"
        install -D -m 0644 "$out/package/$src" "$DEST/$dest"
        M_PKG[$dest]=$pkg M_VER[$dest]=$ver M_TGZ[$dest]=$pin M_SHA[$dest]=$(sha256 "$DEST/$dest") M_LIC[$dest]=$lic
        echo "vendor-web:   $dest"
    done < <(pkg_files "$pkg")
}

mkdir -p "$DEST"
pinned=" "
fetched=0
for entry in "${PACKAGES[@]}"; do
    IFS='|' read -r pkg ver pin lic <<<"$entry"
    pinned+="$pkg "
    if [[ $mode == fetch ]] || ! up_to_date "$pkg" "$ver" "$pin"; then
        fetch "$pkg" "$ver" "$pin" "$lic"
        fetched=$((fetched + 1))
    fi
done

# Packages no longer pinned: their files go.
for path in "${!M_PKG[@]}"; do
    if [[ $pinned != *" ${M_PKG[$path]} "* ]]; then
        echo "vendor-web: removing $path (${M_PKG[$path]} is no longer pinned)"
        forget "${M_PKG[$path]}"
    fi
done

# The folder is embedded whole: anything there that is neither fetched nor ours is an error.
stray=()
while IFS= read -r -d '' file; do
    path=${file#"$DEST"/}
    [[ -n ${M_PKG[$path]:-} || " ${OWN_FILES[*]} " == *" $path "* ]] || stray+=("$path")
done < <(find "$DEST" -type f -print0)
((${#stray[@]} == 0)) || die "not from the pinned list, remove or pin: ${stray[*]} (vendor/web/ holds only what scripts/vendor-web.sh fetches, and is embedded in the binary)"
find "$DEST" -mindepth 1 -type d -empty -delete

{
    echo "$MANIFEST_HEADER"
    for path in "${!M_PKG[@]}"; do
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${M_PKG[$path]}" "${M_VER[$path]}" "${M_TGZ[$path]}" \
            "$path" "${M_SHA[$path]}" "${M_LIC[$path]}"
    done | LC_ALL=C sort -t$'\t' -k4,4
} >"$TMP/MANIFEST.tsv"
if ! cmp -s "$TMP/MANIFEST.tsv" "$MANIFEST"; then
    cp "$TMP/MANIFEST.tsv" "$MANIFEST"
    echo "vendor-web: wrote vendor/web/MANIFEST.tsv"
fi

if ((fetched == 0)); then
    echo "vendor-web: ${#M_PKG[@]} files at their pinned versions and SHA-256 (vendor/web/MANIFEST.tsv)"
else
    echo "vendor-web: fetched $fetched package(s); ${#M_PKG[@]} files listed in vendor/web/MANIFEST.tsv"
fi
