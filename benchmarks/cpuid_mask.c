// A process that loads this library (LD_PRELOAD) sees this CPU without AVX-512, AVX512-BF16,
// AVX512-FP16, AVX-VNNI or AMX: an AVX2-only CPU of the same microarchitecture. Every library
// that picks its kernels by CPUID at run time (oneDNN, MindSpore, ONNX Runtime's MLAS,
// OpenVINO, OpenBLAS, numpy, GCC's target_clones) then picks its AVX2 kernels, so their speeds
// can be compared as on such a CPU. Linux CPUID faulting (arch_prctl ARCH_SET_CPUID; the
// cpuid_fault flag of /proc/cpuinfo) turns each CPUID instruction of the process into SIGSEGV;
// the handler runs the real CPUID, clears those feature bits and steps over the instruction.
// The setting is inherited by threads and forks and reset by execve, where LD_PRELOAD loads
// this library again. (A thread that runs CPUID with SIGSEGV blocked is killed by the kernel.) Other SIGSEGVs go to the handler the program installed (sigaction and
// signal are wrapped so that a later handler, e.g. Python's faulthandler, does not replace this one).
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static struct sigaction program_handler;  // what the program asked for SIGSEGV (default: SIG_DFL)
static int installed;

static sigaction_fn real_sigaction(void) {
  static sigaction_fn real;
  if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  return real;
}

static long cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

#define BIT(n) (1u << (n))

// Bits of CPUID leaf 7 (Intel SDM vol. 2A, "CPUID"; AMD APM vol. 3, appendix E).
static void hide(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
  if (leaf == 7 && subleaf == 0) {
    // EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL
    r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
    // ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
    r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
    // EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8
    r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
  } else if (leaf == 7 && subleaf == 1) {
    // EAX: AVX-VNNI, AVX512_BF16, AMX-FP16, AVX-IFMA; EDX: AVX-VNNI-INT8, AVX-NE-CONVERT, AVX10
    r[0] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
    r[3] &= ~(BIT(4) | BIT(5) | BIT(19));
  }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
  greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
  if (info->si_code == SI_KERNEL && ip[0] == 0x0F && ip[1] == 0xA2) {  // CPUID
    uint32_t leaf = (uint32_t)regs[REG_RAX], subleaf = (uint32_t)regs[REG_RCX], r[4];
    cpuid_faulting(0);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(subleaf));
    cpuid_faulting(1);
    hide(leaf, subleaf, r);
    regs[REG_RAX] = r[0], regs[REG_RBX] = r[1], regs[REG_RCX] = r[2], regs[REG_RDX] = r[3];
    regs[REG_RIP] += 2;
    return;
  }
  struct sigaction handler = program_handler;
  if (handler.sa_handler == SIG_IGN && info->si_code <= 0) return;  // sent, not a fault: ignored
  if (handler.sa_handler == SIG_DFL || handler.sa_handler == SIG_IGN) {
    // A fault re-runs its instruction on return and now gets the default action (death); a
    // sent SIGSEGV is sent again.
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);
    if (info->si_code <= 0) raise(SIGSEGV);
    return;
  }
  if (handler.sa_flags & SA_RESETHAND) program_handler.sa_handler = SIG_DFL, program_handler.sa_flags = 0;
  if (handler.sa_flags & SA_SIGINFO) handler.sa_sigaction(sig, info, context);
  else handler.sa_handler(sig);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  if (sig != SIGSEGV || !installed) return real_sigaction()(sig, act, old);
  if (old) *old = program_handler;
  if (act) program_handler = *act;
  return 0;
}

// glibc's signal() calls its sigaction internally, past the wrapper above (GCC's cc1plus sets
// its crash handler so, then reads CPUID through GMP).
sighandler_t signal(int sig, sighandler_t handler) {
  if (sig != SIGSEGV || !installed) {
    static sighandler_t (*real)(int, sighandler_t);
    if (!real) real = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
    return real(sig, handler);
  }
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  act.sa_flags = SA_RESTART;
  sigemptyset(&act.sa_mask);
  return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void install(void) {
  struct sigaction ours;
  memset(&ours, 0, sizeof ours);
  ours.sa_sigaction = on_segv;
  // SA_ONSTACK: a handler chained behind this one (Python's faulthandler) may rely on an
  // alternate stack for stack overflows.
  ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  program_handler.sa_handler = SIG_DFL;
  if (real_sigaction()(SIGSEGV, &ours, NULL) != 0 || cpuid_faulting(1) != 0) {
    perror("cpuid_mask: CPUID faulting is not available (needs Linux and the cpuid_fault CPU flag)");
    _exit(97);
  }
  installed = 1;
}
