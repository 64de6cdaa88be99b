#!/usr/bin/env bash
# Run a command with the machine's AVX-512 hidden, so that ONNX Runtime, libtorch, our distance
# kernels and glibc take their AVX2 code paths (tools/avx2_only.c: CPUID faulting, a preloaded
# library; the setting reaches every thread and child process). Checks the mask took before
# running anything. Speeds measured through it are the AVX2 code on this machine's cores, not
# an AVX2-only CPU's.
# Usage: tools/avx2_only.sh CMD [ARGS…]   (also usable as cargo's target runner)
#        tools/avx2_only.sh --check       exit 0: it runs here; 1: it is broken (build or
#                                         probe failed); 2: nothing to hide (no AVX-512);
#                                         3: this machine cannot (no cpuid_fault, no gcc)
# The reason is on stderr. Running CMD, any of 1-3 exits 3 before CMD starts.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src="$root/tools/avx2_only.c"
dir="$root/target/avx2_only"
so="$dir/avx2_only.so"
probe="$dir/cpuid_probe"

can_run() {
  if ! grep -qw avx512f /proc/cpuinfo; then
    echo "avx2_only: this CPU has no AVX-512: nothing to hide" >&2
    return 2
  fi
  if ! grep -qw cpuid_fault /proc/cpuinfo; then
    echo "avx2_only: this machine cannot fault CPUID (no cpuid_fault flag), so it cannot hide its AVX-512" >&2
    return 3
  fi
  command -v gcc > /dev/null || { echo "avx2_only: gcc is needed to build $src" >&2; return 3; }
}

build() {
  if [ ! -f "$so" ] || [ ! -f "$probe" ] || [ "$src" -nt "$so" ]; then
    # (set -e does not hold in a function called with ||: every step is checked)
    mkdir -p "$dir" &&
      gcc -O2 -Wall -shared -fPIC -o "$so.$$" "$src" &&
      gcc -O2 -Wall -DPROBE -o "$probe.$$" "$src" &&
      mv -f "$so.$$" "$so" &&
      mv -f "$probe.$$" "$probe" ||
      { echo "avx2_only: building $src failed" >&2; rm -f "$so.$$" "$probe.$$"; return 1; }
  fi
  local seen
  seen=$(LD_PRELOAD="$so" "$probe") || seen="(the probe failed)"
  case "$seen" in
    "avx512f=0 avx512_vnni=0 avx2=1") ;;
    *) echo "avx2_only: the mask did not take (the probe saw: $seen)" >&2; return 1 ;;
  esac
}

if [ "${1:-}" = --check ]; then
  can_run || exit $?
  build || exit 1
  exit 0
fi
[ $# -gt 0 ] || { echo "usage: tools/avx2_only.sh CMD [ARGS…] | --check" >&2; exit 2; }
can_run || exit 3
build || exit 3
export LD_PRELOAD="$so${LD_PRELOAD:+:$LD_PRELOAD}"
# glibc chooses its string functions before any preloaded library runs: tell it directly
export GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
exec "$@"
