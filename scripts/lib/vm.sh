# shellcheck shell=bash
# Shared helpers for the foresnap VM test bed (sourced by scripts/vm-*).
#
# Cache layout (${FORESNAP_VM_CACHE:-<repo>/target/vm}):
#   kernel.env                 KVER / PKG / PKGVER of the unpacked kernel
#   kernel/<KVER>/             `dpkg -x` of linux-image-<KVER> (boot/, lib/modules/)
#   vmlinuz                    -> kernel/<KVER>/boot/vmlinuz-<KVER>
#   initramfs.cpio.gz          busybox + decompressed modules + /init
#   initramfs.stamp            hash of the initramfs inputs (rebuilt when it changes)
#   initramfs.modules          modules loaded by /init, in order (informational)
#   .lock                      flock for concurrent builders

VM_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_SCRIPTS_DIR=$(dirname "$VM_LIB_DIR")
VM_REPO=$(dirname "$VM_SCRIPTS_DIR")
VM_CACHE=$(realpath -m -- "${FORESNAP_VM_CACHE:-$VM_REPO/target/vm}")
VM_BACKPORTS_SOURCES=/etc/apt/sources.list.d/foresnap-backports.sources

# Modules /init loads, in this order (dependencies are resolved and put first).
# Built-in ones (=y in the kernel config) are skipped. Extra modules can be added
# with FORESNAP_VM_EXTRA_MODULES="overlay xfs" (they are also modprobe-able).
VM_MODULES=(netfs 9pnet 9pnet_virtio 9p configfs ublk_drv loop null_blk
    crc16 crc32c_generic mbcache jbd2 ext4)

vm_say() { printf 'vm: %s\n' "$*" >&2; }
vm_die() {
    printf 'vm: error: %s\n' "$*" >&2
    exit 1
}

# apt-get update, waiting (up to 10 min) while another apt/dpkg holds the lock.
vm_apt_update() {
    local i err
    for ((i = 0; i < 200; i++)); do
        if err=$(apt-get -q -o DPkg::Lock::Timeout=600 update 2>&1 >/dev/null); then
            return 0
        fi
        case $err in
        *"Could not get lock"* | *"Unable to lock"*) sleep 3 ;;
        *)
            printf '%s\n' "$err" >&2
            return 1
            ;;
        esac
    done
    echo "apt-get update: lock still held after 10 minutes" >&2
    return 1
}

vm_need_root() {
    [[ $(id -u) -eq 0 ]] || vm_die "$1 needs root (apt-get / dpkg)"
}

# Run scripts/install-deps only when a needed tool is missing.
vm_ensure_deps() {
    local need=0 t
    for t in qemu-system-x86_64 cpio xz gzip; do
        command -v "$t" >/dev/null 2>&1 || need=1
    done
    [[ -x /bin/busybox && $(/bin/busybox --list 2>/dev/null) == *$'\n'depmod$'\n'* ]] || need=1
    [[ -e /usr/share/qemu/qboot.rom || -e /usr/share/seabios/bios-256k.bin ]] || need=1
    if ((need)); then
        vm_say "installing host packages (scripts/install-deps)"
        "$VM_SCRIPTS_DIR/install-deps"
    fi
}

# Write the bookworm-backports apt source derived from the first stanza of the
# machine's deb822 Debian source (same URIs / Components / Signed-By).
vm_write_backports_source() {
    local src=/etc/apt/sources.list.d/debian.sources codename stanza
    [[ -r $src ]] || vm_die "$src not found: cannot derive the backports source"
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    stanza=$(awk '
        BEGIN { started = 0; skip = 0 }
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*$/ { if (started) exit; else next }
        /^[[:space:]]/ { if (!skip) print; next }
        {
            started = 1; f = tolower($0); sub(/:.*/, "", f)
            if (f == "suites" || f == "enabled") { skip = 1; next }
            skip = 0; print
        }' "$src")
    [[ -n $stanza ]] || vm_die "no stanza found in $src"
    local new
    new=$(printf '# Written by foresnap scripts/lib/vm.sh (derived from %s)\n%s\nSuites: %s-backports\n' \
        "$src" "$stanza" "$codename")
    if [[ ! -f $VM_BACKPORTS_SOURCES ]] || [[ $(cat "$VM_BACKPORTS_SOURCES") != "$new" ]]; then
        printf '%s\n' "$new" >"$VM_BACKPORTS_SOURCES"
        return 0 # changed
    fi
    return 1 # unchanged
}

# Pick the newest installable linux-image-6.12.*-amd64 (signed image, no -dbg,
# -unsigned, -cloud, -rt). Prints "PKG VERSION".
vm_pick_kernel_pkg() {
    local p c best="" bestv=""
    while read -r p; do
        c=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ { print $2 }')
        [[ -n $c && $c != "(none)" ]] || continue
        if [[ -z $best ]] || dpkg --compare-versions "$c" gt "$bestv"; then
            best=$p bestv=$c
        fi
    done < <(apt-cache pkgnames linux-image-6.12 | grep -E '^linux-image-6\.12\.[0-9]+\+[a-z0-9.]+-amd64$')
    [[ -n $best ]] || return 1
    echo "$best $bestv"
}

# Fetch + unpack the kernel package into the cache (no-op when cached).
# Arg "--update": re-resolve the newest package even when one is cached.
vm_ensure_kernel() {
    local update=0
    [[ ${1:-} == --update ]] && update=1
    if ((!update)) && [[ -f $VM_CACHE/kernel.env && -e $VM_CACHE/vmlinuz ]]; then
        if [[ -z ${FORESNAP_VM_KERNEL_PKG:-} ]] ||
            grep -qx "PKG=$FORESNAP_VM_KERNEL_PKG" "$VM_CACHE/kernel.env"; then
            return 0
        fi
    fi
    vm_need_root "fetching the VM kernel"
    mkdir -p "$VM_CACHE"
    vm_write_backports_source || true
    # Full update (rare: only when the cache is empty) so that the choice of the
    # newest 6.12 kernel sees every configured suite, the same on every machine.
    vm_say "apt-get update (with $VM_BACKPORTS_SOURCES)"
    vm_apt_update || vm_die "apt-get update failed"
    local pkg ver
    if [[ -n ${FORESNAP_VM_KERNEL_PKG:-} ]]; then
        pkg=$FORESNAP_VM_KERNEL_PKG
        ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
    else
        read -r pkg ver < <(vm_pick_kernel_pkg) || vm_die "no linux-image-6.12.*-amd64 package found (apt-cache)"
    fi
    [[ -n $ver && $ver != "(none)" ]] || vm_die "package $pkg has no installable version"
    local kver=${pkg#linux-image-}
    if [[ -f $VM_CACHE/kernel.env ]] && grep -qx "PKG=$pkg" "$VM_CACHE/kernel.env" &&
        grep -qx "PKGVER=$ver" "$VM_CACHE/kernel.env" && [[ -e $VM_CACHE/vmlinuz ]]; then
        vm_say "kernel $pkg $ver already cached"
        return 0
    fi
    vm_say "downloading $pkg $ver"
    local dl
    rm -rf "$VM_CACHE"/.dl.*
    dl=$(mktemp -d "$VM_CACHE/.dl.XXXXXX")
    chown _apt "$dl" 2>/dev/null || true # apt downloads as _apt (else: unsandboxed warning)
    (cd "$dl" && apt-get -q download "$pkg=$ver" >/dev/null 2>"$dl/err") || {
        cat "$dl/err" >&2
        rm -rf "$dl"
        vm_die "apt-get download $pkg=$ver failed"
    }
    vm_say "unpacking into $VM_CACHE/kernel/$kver"
    rm -rf "$VM_CACHE/kernel/$kver.tmp"
    mkdir -p "$VM_CACHE/kernel"
    dpkg -x "$dl"/*.deb "$VM_CACHE/kernel/$kver.tmp"
    rm -rf "$dl" "$VM_CACHE/kernel/$kver"
    mv "$VM_CACHE/kernel/$kver.tmp" "$VM_CACHE/kernel/$kver"
    local ko
    ko=$(find "$VM_CACHE/kernel/$kver/lib/modules/$kver" -name 'ublk_drv.ko*' | head -n 1)
    [[ -n $ko ]] || vm_die "$pkg has no ublk_drv module"
    ln -sfn "kernel/$kver/boot/vmlinuz-$kver" "$VM_CACHE/vmlinuz"
    printf 'KVER=%s\nPKG=%s\nPKGVER=%s\n' "$kver" "$pkg" "$ver" >"$VM_CACHE/kernel.env"
    # Drop kernels of older versions.
    local d
    for d in "$VM_CACHE"/kernel/*; do
        [[ $d == "$VM_CACHE/kernel/$kver" ]] || rm -rf "$d"
    done
    vm_say "kernel $kver ready"
}

vm_kver() { sed -n 's/^KVER=//p' "$VM_CACHE/kernel.env"; }

# Decompressed content of a module file (.ko, .ko.xz, .ko.zst, .ko.gz).
vm_ko_cat() {
    case $1 in
    *.xz) xz -dc "$1" ;;
    *.zst) zstd -qdc "$1" ;;
    *.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}

# The /init of the initramfs. @KVER@ and @MODULES@ are substituted.
vm_init_script() {
    cat <<'INIT'
#!/bin/sh
# foresnap VM init (generated by scripts/lib/vm.sh). Runs as PID 1 and stays in
# the initramfs root; the user command runs chrooted into the host root (/host).
export PATH=/sbin:/bin
KVER=@KVER@
CTL=/host/run/foresnap-vm/ctl

log() { echo "vm-init: $*" >/dev/console; }
fail() {
    log "FATAL: $*"
    dmesg | tail -n 30 >/dev/console
    sync
    poweroff -f
    sleep 10
}

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo /sbin/modprobe >/proc/sys/kernel/modprobe
ip link set lo up 2>/dev/null
hostname foresnap-vm

while read -r name file params; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2086
    insmod "/lib/modules/$KVER/$file" $params || log "insmod $name failed"
done <<'MODS'
@MODULES@
MODS

# 9p options: root is read-only; cache=loose unless FORESNAP_VM_ROOT_CACHE says otherwise.
MSIZE=512000
ROOTCACHE=loose
for a in $(cat /proc/cmdline); do
    case "$a" in
    foresnap.rootcache=*) ROOTCACHE=${a#*=} ;;
    foresnap.msize=*) MSIZE=${a#*=} ;;
    esac
done
O9P="trans=virtio,version=9p2000.L,msize=$MSIZE"

mkdir -p /host
mount -t 9p -o "$O9P,ro,cache=$ROOTCACHE" hostroot /host || fail "mounting host root over 9p"
mount -t proc proc /host/proc || fail "mount /host/proc"
mount -t sysfs sysfs /host/sys || fail "mount /host/sys"
mount -t devtmpfs devtmpfs /host/dev || fail "mount /host/dev"
# devtmpfs has no /dev/fd and /dev/std*: bash's process substitution needs /dev/fd.
ln -sfn /proc/self/fd /host/dev/fd
ln -sfn /proc/self/fd/0 /host/dev/stdin
ln -sfn /proc/self/fd/1 /host/dev/stdout
ln -sfn /proc/self/fd/2 /host/dev/stderr
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
[ -d /sys/kernel/config ] && mount -t configfs configfs /host/sys/kernel/config
mount -t tmpfs -o mode=755 tmpfs /host/run || fail "mount /host/run"
mount -t tmpfs -o mode=1777,size=75% tmpfs /host/tmp || fail "mount /host/tmp"
mkdir -p "$CTL" /host/run/foresnap-vm/bin
mount -t 9p -o "$O9P,cache=none" ctl "$CTL" || fail "mounting the control share"

# Extra 9p shares: "rw|ro <TAB> tag <TAB> path" lines, parents first.
TAB=$(printf '\t')
while IFS="$TAB" read -r mode tag path; do
    [ -n "$tag" ] || continue
    mkdir -p "/host$path" 2>/dev/null
    o="$O9P,cache=mmap"
    [ "$mode" = ro ] && o="$O9P,ro,cache=$ROOTCACHE"
    mount -t 9p -o "$o" "$tag" "/host$path" || fail "mounting share $tag at $path"
done <"$CTL/shares"

# Module tools inside the guest (the host root has no kmod and no /lib/modules):
# they run busybox in the initramfs root, where /lib/modules/$KVER lives.
for t in modprobe rmmod modinfo lsmod; do
    printf '#!/bin/sh\nexec chroot /proc/1/root /bin/busybox %s "$@"\n' "$t" >"/host/run/foresnap-vm/bin/$t"
    chmod 755 "/host/run/foresnap-vm/bin/$t"
done

# Command output goes to two virtio-serial ports (raw, no tty line discipline).
OUT=/dev/console ERR=/dev/console
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    case "$(cat "$p/name")" in
    foresnap.stdout) OUT=/dev/${p##*/} ;;
    foresnap.stderr) ERR=/dev/${p##*/} ;;
    esac
done

echo "foresnap-vm: init done, running the command" >/dev/kmsg
# The host retries a boot that died before this point (vm-run).
: >"$CTL/started"
sync
chroot /host /bin/bash /run/foresnap-vm/ctl/cmd.sh </dev/null >"$OUT" 2>"$ERR"
rc=$?
echo "foresnap-vm: command exited with status $rc" >/dev/kmsg
sync
dmesg >"$CTL/dmesg.txt" 2>/dev/null
echo "$rc" >"$CTL/status"
sync
poweroff -f
sleep 10
INIT
}

# Build the initramfs if its inputs changed.
vm_ensure_initramfs() {
    local kver kdir moddir
    kver=$(vm_kver)
    kdir=$VM_CACHE/kernel/$kver
    moddir=$kdir/lib/modules/$kver
    local -a wanted=("${VM_MODULES[@]}")
    local extra=${FORESNAP_VM_EXTRA_MODULES:-}
    # shellcheck disable=SC2206
    [[ -n $extra ]] && wanted+=($extra)
    local stamp
    stamp=$({
        echo "$kver"
        echo "${wanted[*]}"
        vm_init_script
        cat /bin/busybox "$VM_LIB_DIR/vm.sh"
    } | sha256sum | cut -c1-32)
    if [[ -f $VM_CACHE/initramfs.cpio.gz && -f $VM_CACHE/initramfs.stamp &&
        $(cat "$VM_CACHE/initramfs.stamp") == "$stamp" ]]; then
        return 0
    fi
    vm_say "building initramfs for $kver"

    # name -> path index over all module files (names normalise '-' to '_').
    local -A path_of=()
    local f n
    while IFS= read -r f; do
        n=${f##*/}
        n=${n%%.ko*}
        path_of[${n//-/_}]=$f
    done < <(cd "$moddir" && find kernel -name '*.ko*')
    local -A builtin=()
    while IFS= read -r f; do
        n=${f##*/}
        n=${n%.ko}
        builtin[${n//-/_}]=1
    done <"$moddir/modules.builtin"

    local stage
    rm -rf "$VM_CACHE"/.initramfs.*
    stage=$(mktemp -d "$VM_CACHE/.initramfs.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,host,lib/modules/"$kver"}
    cp /bin/busybox "$stage/bin/busybox"
    ln -s ../bin/busybox "$stage/sbin/modprobe"
    ln -s busybox "$stage/bin/sh"

    local -A seen=()
    local order="" builtins=""
    _vm_add_module() {
        local m=${1//-/_} dep deps rel
        [[ -n ${seen[$m]:-} ]] && return 0
        seen[$m]=1
        if [[ -n ${builtin[$m]:-} ]]; then
            builtins+=" $m"
            return 0
        fi
        rel=${path_of[$m]:-}
        [[ -n $rel ]] || vm_die "module $m not found in $moddir"
        local out=$stage/lib/modules/$kver/${rel%.ko*}.ko
        mkdir -p "$(dirname "$out")"
        vm_ko_cat "$moddir/$rel" >"$out"
        deps=$(tr '\0' '\n' <"$out" | sed -n 's/^depends=//p')
        for dep in ${deps//,/ }; do
            _vm_add_module "$dep"
        done
        local params=""
        [[ $m == null_blk ]] && params="nr_devices=0"
        order+="$m ${rel%.ko*}.ko $params"$'\n'
    }
    for n in "${wanted[@]}"; do
        _vm_add_module "$n"
    done
    unset -f _vm_add_module

    cp "$moddir"/modules.builtin "$moddir"/modules.order "$stage/lib/modules/$kver/" 2>/dev/null || true
    [[ -f $moddir/modules.builtin.modinfo ]] && cp "$moddir/modules.builtin.modinfo" "$stage/lib/modules/$kver/"
    /bin/busybox depmod -b "$stage" "$kver"

    local init
    init=$(vm_init_script)
    init=${init//@KVER@/$kver}
    init=${init//@MODULES@/${order%$'\n'}}
    printf '%s\n' "$init" >"$stage/init"
    chmod 755 "$stage/init"

    (cd "$stage" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --quiet -R 0:0 | gzip -1) >"$VM_CACHE/initramfs.cpio.gz.tmp"
    mv "$VM_CACHE/initramfs.cpio.gz.tmp" "$VM_CACHE/initramfs.cpio.gz"
    {
        printf '# loaded by /init in this order (name file params)\n%s' "$order"
        printf '# built in (=y), not loaded:%s\n' "${builtins:- none}"
    } >"$VM_CACHE/initramfs.modules"
    echo "$stamp" >"$VM_CACHE/initramfs.stamp"
    rm -rf "$stage"
    vm_say "initramfs ready ($(du -h "$VM_CACHE/initramfs.cpio.gz" | cut -f1); modules:$(awk '!/^#/ { printf " %s", $1 }' "$VM_CACHE/initramfs.modules"))"
}

# Everything vm-run needs, serialised with a lock.
vm_ensure_all() {
    mkdir -p "$VM_CACHE" 2>/dev/null || vm_die "cannot create cache dir $VM_CACHE"
    local lockfd
    exec {lockfd}>"$VM_CACHE/.lock"
    flock "$lockfd"
    vm_ensure_deps
    vm_ensure_kernel "$@"
    vm_ensure_initramfs
    exec {lockfd}>&-
}
