/* avx2_only.so — make a process on an AVX-512 machine see an AVX2-only CPU.
 *
 * Why: ONNX Runtime (MLAS), libtorch, our distance kernels and glibc choose their code paths
 * from CPUID, and the machines we run on vary (some AVX-512 + VNNI, some AVX2 only). Preloaded,
 * this makes the AVX2 code paths run on whatever machine is at hand: the test suite checks them
 * (tools/test.sh), and benchmarks can time them. It does not make this machine an AVX2-only
 * one: the cores, caches and clocks stay this machine's, so a speed measured through it says
 * how the AVX2 *code* runs here, not how an AVX2-only CPU would.
 *
 * How: Linux CPUID faulting (arch_prctl ARCH_SET_CPUID 0, needs the `cpuid_fault` CPU flag):
 * every CPUID instruction of the process then traps with SIGSEGV; the handler runs the real
 * CPUID with faulting briefly off, clears the AVX-512 / VNNI / AMX bits, writes the result
 * into the trapped registers and steps over the instruction. The setting is kept across
 * threads and fork, and reset by execve (so child programs are not masked unless preloaded).
 * A program that installs its own SIGSEGV handler (Rust's std, rustc) would replace this one
 * and then die at its next CPUID, so sigaction() and signal() for SIGSEGV are intercepted: the
 * program's handler is kept aside and called for every fault that is not a CPUID.
 * Limits: glibc picks its own string functions before any preload runs (the script hides
 * AVX-512 from it with GLIBC_TUNABLES); a thread that blocks SIGSEGV and then runs CPUID is
 * killed; sigset()/raw rt_sigaction (e.g. Go's runtime) are not intercepted.
 *
 * Use: tools/avx2_only.sh CMD… builds this and runs CMD under it. Built with -DPROBE it is a
 * program printing what CPUID says (the script's check that the mask took).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

static volatile long trapped;

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

#ifndef PROBE
static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                  (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512_FP16 23, AMX-TILE 24, AMX-INT8 25 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512_BF16 5, AMX-FP16 21, AVX-IFMA 23 */
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        /* EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX-VNNI-INT16 10, AVX10 19,
         * APX 21 (none of which an AVX2-only CPU has) */
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19) | (1u << 21));
    } else if (leaf == 0xD && sub == 0) {
        /* XSAVE state components 5-7 (opmask, ZMM halves), 17-18 (AMX) and 19 (APX) no longer
         * offered */
        r[0] &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18) | (1u << 19));
    } else if (leaf == 0x24) {
        r[0] = r[1] = r[2] = r[3] = 0; /* AVX10 converged vector ISA leaf */
    }
}

/* The process's own SIGSEGV handler (Rust's stack-overflow report, rustc's, a JIT's): kept
 * here, reported to it as installed, and called for every fault that is not a CPUID. */
static struct sigaction app_sa; /* sa_handler SIG_DFL when zeroed */
static int installed;

static int real_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static int (*next)(int, const struct sigaction *, struct sigaction *);
    if (!next)
        next = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    return next(sig, act, old);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !installed)
        return real_sigaction(sig, act, old);
    if (old)
        *old = app_sa;
    if (act)
        app_sa = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t h) {
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = h;
    sa.sa_flags = SA_RESTART; /* glibc's signal(): BSD semantics */
    if (sigaction(sig, &sa, &old) != 0)
        return SIG_ERR;
    return old.sa_handler;
}

/* A fault that is not a CPUID, or a SIGSEGV sent by kill/raise: as the process asked. */
static void pass_on(int sig, siginfo_t *info, void *ctx) {
    struct sigaction app = app_sa;
    if ((app.sa_flags & SA_SIGINFO) || (app.sa_handler != SIG_DFL && app.sa_handler != SIG_IGN)) {
        if (app.sa_flags & SA_RESETHAND)
            memset(&app_sa, 0, sizeof app_sa);
        /* the handler's own mask (SIGSEGV stays open: a CPUID in it must still be answered) */
        sigset_t block, old;
        block = app.sa_mask;
        sigdelset(&block, SIGSEGV);
        pthread_sigmask(SIG_BLOCK, &block, &old);
        if (app.sa_flags & SA_SIGINFO)
            app.sa_sigaction(sig, info, ctx);
        else
            app.sa_handler(sig);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return;
    }
    if (app.sa_handler == SIG_IGN && info->si_code <= 0)
        return; /* a sent SIGSEGV the process ignores (a fault cannot be ignored) */
    /* the default action: a fault recurs when the handler returns; a sent signal is sent again */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction(SIGSEGV, &dfl, NULL);
    if (info->si_code <= 0)
        raise(sig);
}

static void on_segv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = ctx_;
    greg_t *g = ctx->uc_mcontext.gregs;
    /* a faulted CPUID comes as a general-protection fault (SI_KERNEL) at the instruction */
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    if (info->si_code != SI_KERNEL || ip == NULL || ip[0] != 0x0F || ip[1] != 0xA2) {
        pass_on(sig, info, ctx_);
        return;
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    real_cpuid(leaf, sub, r);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    mask(leaf, sub, r);
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    __atomic_add_fetch(&trapped, 1, __ATOMIC_RELAXED);
}

static void report(void) {
    if (getenv("AVX2_ONLY_VERBOSE"))
        fprintf(stderr, "avx2_only: %ld CPUID instructions answered without AVX-512\n", trapped);
}

__attribute__((constructor)) static void avx2_only_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    /* on the thread's alternate stack when it has one (a stack overflow's handler needs it) */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, &app_sa) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "avx2_only: this machine cannot fault CPUID (no cpuid_fault flag): refusing to run unmasked\n");
        _exit(3);
    }
    installed = 1;
    atexit(report);
}
#else
/* Prints the AVX-512F, AVX512-VNNI and AVX2 bits as this process sees them. */
int main(void) {
    uint32_t r[4];
    real_cpuid(7, 0, r);
    printf("avx512f=%u avx512_vnni=%u avx2=%u\n", (r[1] >> 16) & 1, (r[2] >> 11) & 1, (r[1] >> 5) & 1);
    return 0;
}
#endif
