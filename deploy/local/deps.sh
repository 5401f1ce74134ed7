# Sourced by the local scripts: installs the Debian and Python packages Shoal's tests and demo use.

# Debian packages: the real registry, image tools, FUSE, the container runtime, and network tools.
SHOAL_DEBS=(docker-registry umoci skopeo fuse3 containerd runc apache2-utils attr debootstrap
    iproute2 iptables zstd curl pkg-config busybox-static protobuf-compiler)

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

install_deps() {
    local missing=()
    for p in "${SHOAL_DEBS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "== installing Debian packages: ${missing[*]}"
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    if ! command -v moto_server >/dev/null; then
        echo "== installing moto (S3-compatible test server)"
        python3 -m pip install -q 'moto[server]'
    fi
    if ! python3 -m kubernetes_validate --version >/dev/null 2>&1; then
        echo "== installing kubernetes-validate (Kubernetes schemas for the deploy/ manifests)"
        python3 -m pip install -q kubernetes-validate
    fi
}

# A build cache outside the clone, so repeated runs on one machine build once.
default_target_dir() {
    local dir=/var/cache/shoal/target
    if mkdir -p "$dir" 2>/dev/null && [[ -w $dir ]]; then echo "$dir"; else echo "$PWD/target"; fi
}
