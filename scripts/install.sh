#!/usr/bin/env bash
# Installs a built modelfs (swift build -c release --product modelfs) for the whole machine:
#   PREFIX/bin/modelfs                  the binary (PREFIX: /usr/local)
#   /usr/sbin/mount.fuse.modelfs        mount(8)'s helper: `mount -t fuse.modelfs`, /etc/fstab
#   /etc/systemd/system/modelfs@.service the node service (contrib/systemd)
#   PREFIX/share/man/man1/modelfs.1     the manual, made by swift-argument-parser's generate-manual
#   bash, zsh and fish completions      made by `modelfs --generate-completion-script`
#   /etc/modelfs/modelfs.example.yaml   an example config
# Usage: scripts/install.sh [--prefix DIR] [--destdir DIR]   (--destdir: stage under DIR, as
# packagers do; nothing outside it is touched)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
prefix=/usr/local
destdir=
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --destdir) destdir="$2"; shift 2 ;;
        *) echo "modelfs: install.sh: unknown argument $1 (use --prefix DIR, --destdir DIR)" >&2; exit 2 ;;
    esac
done
bin=.build/release/modelfs
if [ ! -x "$bin" ]; then
    echo "modelfs: $bin is missing; build it first: swift build -c release --product modelfs" >&2
    exit 1
fi
swift build -c release --product generate-manual >/dev/null

root="$destdir"
install -d "$root$prefix/bin" "$root/usr/sbin" "$root/etc/systemd/system" "$root$prefix/share/man/man1" \
    "$root/etc/modelfs" "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
install -m 0755 "$bin" "$root$prefix/bin/modelfs"
ln -sfn "$prefix/bin/modelfs" "$root/usr/sbin/mount.fuse.modelfs"
sed "s|/usr/local/bin/modelfs|$prefix/bin/modelfs|g" contrib/systemd/modelfs@.service > "$root/etc/systemd/system/modelfs@.service"
chmod 0644 "$root/etc/systemd/system/modelfs@.service"
install -m 0644 contrib/modelfs.example.yaml "$root/etc/modelfs/modelfs.example.yaml"
"$bin" --generate-completion-script bash > "$root/usr/share/bash-completion/completions/modelfs"
"$bin" --generate-completion-script zsh > "$root/usr/share/zsh/vendor-completions/_modelfs"
"$bin" --generate-completion-script fish > "$root/usr/share/fish/vendor_completions.d/modelfs.fish"
.build/release/generate-manual "$bin" --output-directory "$root$prefix/share/man/man1" >/dev/null
if [ -z "$destdir" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "modelfs: installed $prefix/bin/modelfs, /usr/sbin/mount.fuse.modelfs, modelfs@.service, man page and completions${destdir:+ under $destdir}"
