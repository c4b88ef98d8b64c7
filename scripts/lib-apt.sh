# Sourced by scripts/install-*.sh: apt_install PKG... installs the given Debian packages, as
# root or through sudo; without either it names the command to run and exits 1.
apt_install() {
    [ "$#" -gt 0 ] || return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "modelfs: missing packages $*; install them as root: apt-get install $*" >&2
            exit 1
        fi
    fi
    echo "installing $*"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
