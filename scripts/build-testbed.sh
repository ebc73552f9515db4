#!/usr/bin/env bash
# Build the test bed's Go binaries (kube-apiserver, kube-controller-manager, etcd, MinIO, helm)
# from the pinned wrapper modules in testbed/go/, once, into a cache keyed by component and
# version: $KUBEDREAM_CACHE/bin/<component>-<version>/<binary> (default ~/.cache/kubedream).
# A binary that is already there is never rebuilt, so a warm run takes a fraction of a second.
#
# Called by `make testbed-bins` and by kubedream_operator.devbed.build (the `bed` pytest
# fixture and `kubedream dev up`).
#
#   scripts/build-testbed.sh [COMPONENT...]   build what is missing (default: every component)
#   scripts/build-testbed.sh --print-paths    print "<binary> <path>" for every binary; build nothing
#
# Environment: KUBEDREAM_CACHE (cache root), KUBEDREAM_GO_JOBS (go build -p, default 2).
# Builds run under `nice -n 10`; each one logs to $KUBEDREAM_CACHE/logs/<component>-<version>.log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${KUBEDREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubedream}
JOBS=${KUBEDREAM_GO_JOBS:-2}
COMPONENTS=(kubernetes etcd minio helm)

# The module whose version names the component's cache folder.
main_module() {
    case $1 in
        kubernetes) echo k8s.io/kubernetes ;;
        etcd) echo go.etcd.io/etcd/server/v3 ;;
        minio) echo github.com/minio/minio ;;
        helm) echo helm.sh/helm/v3 ;;
        *) echo "unknown component: $1" >&2; return 1 ;;
    esac
}

# "binary package" pairs for a component.
binaries() {
    case $1 in
        kubernetes)
            echo kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
            echo kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
            ;;
        etcd) echo etcd go.etcd.io/etcd/server/v3 ;;
        minio) echo minio github.com/minio/minio ;;
        helm) echo helm helm.sh/helm/v3/cmd/helm ;;
    esac
}

# The version the wrapper go.mod pins for the component's main module.
version() {
    local module
    module=$(main_module "$1")
    awk -v m="$module" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$ROOT/testbed/go/$1/go.mod"
}

# Link flags that stamp the real version where each program reports it.
ldflags() {
    local v=$2 now
    now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    case $1 in
        kubernetes)
            local major minor flags="-s -w" pkg
            major=$(echo "${v#v}" | cut -d. -f1)
            minor=$(echo "${v#v}" | cut -d. -f2)
            for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
                flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
                flags+=" -X $pkg.gitCommit=$v -X $pkg.gitTreeState=clean -X $pkg.buildDate=$now"
            done
            echo "$flags"
            ;;
        etcd) echo "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$v" ;;
        minio)
            # Pseudo-version v0.0.0-YYYYMMDDhhmmss-commit: MinIO's release tag is that commit time.
            local stamp commit tag
            stamp=$(echo "$v" | cut -d- -f2)
            commit=$(echo "$v" | cut -d- -f3)
            local day="${stamp:0:4}-${stamp:4:2}-${stamp:6:2}"
            tag="${day}T${stamp:8:2}-${stamp:10:2}-${stamp:12:2}Z"
            echo "-s -w -X github.com/minio/minio/cmd.Version=${day}T${stamp:8:2}:${stamp:10:2}:${stamp:12:2}Z" \
                "-X github.com/minio/minio/cmd.ReleaseTag=RELEASE.${tag} -X github.com/minio/minio/cmd.CopyrightYear=${stamp:0:4}" \
                "-X github.com/minio/minio/cmd.CommitID=$commit -X github.com/minio/minio/cmd.ShortCommitID=${commit:0:12}"
            ;;
        helm) echo "-s -w -X helm.sh/helm/v3/internal/version.version=$v -X helm.sh/helm/v3/internal/version.gitTreeState=clean" ;;
    esac
}

print_paths() {
    local c v name pkg
    for c in "${COMPONENTS[@]}"; do
        v=$(version "$c")
        while read -r name pkg; do
            echo "$name $CACHE/bin/$c-$v/$name"
        done < <(binaries "$c")
    done
}

# Build one component unless all its binaries are cached. Builds into a temporary folder and
# renames it into place, so a half-finished build never looks cached.
build() {
    local c=$1 v dest log tmp name pkg missing=0 pkgs=() names=() out start elapsed
    v=$(version "$c")
    [[ -n $v ]] || { echo "no version for $c in testbed/go/$c/go.mod" >&2; return 1; }
    dest=$CACHE/bin/$c-$v
    while read -r name pkg; do
        [[ -x $dest/$name ]] || missing=1
        pkgs+=("$pkg")
        names+=("$name")
    done < <(binaries "$c")
    if [[ $missing == 0 ]]; then
        printf '%-11s %-40s cached\n' "$c" "$v"
        return 0
    fi
    # Go is needed only to build: a machine with every binary cached runs without it.
    command -v go >/dev/null || { echo "go is not installed; $c $v is not cached and the test bed is built from Go modules" >&2; return 1; }
    mkdir -p "$CACHE/logs" "$CACHE/bin"
    log=$CACHE/logs/$c-$v.log
    tmp=$(mktemp -d "$CACHE/bin/.$c-$v.XXXXXX")
    printf '%-11s %-40s building (log: %s)\n' "$c" "$v" "$log"
    # One package: name the binary (go would call etcd's "server"). Several: go names each
    # after its folder.
    out="$tmp/"
    [[ ${#pkgs[@]} -gt 1 ]] || out="$tmp/${names[0]}"
    start=$(date +%s)
    if ! (cd "$ROOT/testbed/go/$c" &&
        CGO_ENABLED=0 nice -n 10 go build -p "$JOBS" -trimpath -ldflags "$(ldflags "$c" "$v")" \
            -o "$out" "${pkgs[@]}") >"$log" 2>&1; then
        rm -rf "$tmp"
        echo "build of $c $v failed; last lines of $log:" >&2
        tail -n 30 "$log" >&2
        return 1
    fi
    chmod 755 "$tmp"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    elapsed=$(($(date +%s) - start))
    printf '%-11s %-40s built in %dm%02ds\n' "$c" "$v" $((elapsed / 60)) $((elapsed % 60))
    echo "built in ${elapsed}s on $(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$log"
}

main() {
    if [[ ${1:-} == --print-paths ]]; then
        print_paths
        return 0
    fi
    local wanted=("$@") c
    [[ ${#wanted[@]} -gt 0 ]] || wanted=("${COMPONENTS[@]}")
    for c in "${wanted[@]}"; do main_module "$c" >/dev/null; done
    mkdir -p "$CACHE"
    # One builder at a time: parallel test sessions wait here rather than build twice.
    exec 9>"$CACHE/build.lock"
    flock 9
    for c in "${wanted[@]}"; do build "$c"; done
}

main "$@"
