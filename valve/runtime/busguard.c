/* A SIGBUS guard for shared file mappings that another process may truncate (see busguard.py).
 *
 * A load or store to a page of a MAP_SHARED file mapping past the file's end raises SIGBUS (BUS_ADRERR); on
 * return the CPU retries the access. For an address inside a guarded range the handler maps a private zero page
 * over the faulting page, so the retried access succeeds: a load reads 0 and the caller's next header check sees
 * a damaged block. Any other SIGBUS goes to the action that was installed before ours. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_RANGES 256

static uintptr_t starts[MAX_RANGES], ends[MAX_RANGES];
static int nranges;                 /* published with release order after the range is written */
static unsigned long page_size;
static unsigned long pages_replaced;
static struct sigaction previous;
static int installed;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int guarded(uintptr_t a) {
    int n = __atomic_load_n(&nranges, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++)
        if (a >= __atomic_load_n(&starts[i], __ATOMIC_RELAXED) && a < __atomic_load_n(&ends[i], __ATOMIC_RELAXED))
            return 1;
    return 0;
}

static void on_sigbus(int sig, siginfo_t *si, void *ctx) {
    uintptr_t a = (uintptr_t)si->si_addr;
    if (si->si_code == BUS_ADRERR && guarded(a)) {
        /* raw syscall: the libc wrapper is not on the async-signal-safe list */
        long p = syscall(SYS_mmap, a & ~(uintptr_t)(page_size - 1), page_size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p != -1) {
            __atomic_add_fetch(&pages_replaced, 1, __ATOMIC_RELAXED);
            return;
        }
    }
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, si, ctx);
        return;
    }
    if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* the default action: a fault re-executes and faults again under it; a sent signal is sent again */
    signal(sig, SIG_DFL);
    if (si->si_code <= 0)
        raise(sig);
}

static int install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    page_size = (unsigned long)sysconf(_SC_PAGESIZE);
    return sigaction(SIGBUS, &sa, &previous);
}

/* Guard [addr, addr + len). 0 on success, -1 if the table is full or the handler cannot be installed. */
EXPORT int valve_busguard_add(void *addr, size_t len) {
    int rc = -1;
    pthread_mutex_lock(&lock);
    if (!installed && install() == 0)
        installed = 1;
    int n = __atomic_load_n(&nranges, __ATOMIC_RELAXED);
    for (int i = 0; installed && i < n && rc; i++)  /* reuse a freed slot */
        if (starts[i] == 0 && ends[i] == 0) {
            /* start first: until the end is written the range is empty */
            __atomic_store_n(&starts[i], (uintptr_t)addr, __ATOMIC_RELAXED);
            __atomic_store_n(&ends[i], (uintptr_t)addr + len, __ATOMIC_RELEASE);
            rc = 0;
        }
    if (installed && rc && n < MAX_RANGES) {
        starts[n] = (uintptr_t)addr;
        ends[n] = (uintptr_t)addr + len;
        __atomic_store_n(&nranges, n + 1, __ATOMIC_RELEASE);
        rc = 0;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* Stop guarding the range that starts at addr (before its mapping is closed: the address may be reused). */
EXPORT void valve_busguard_remove(void *addr) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < nranges; i++)
        if (starts[i] == (uintptr_t)addr) {
            __atomic_store_n(&ends[i], 0, __ATOMIC_RELEASE);
            __atomic_store_n(&starts[i], 0, __ATOMIC_RELAXED);
        }
    pthread_mutex_unlock(&lock);
}

/* Pages replaced by zero pages so far (each one a touch of a truncated file). */
EXPORT unsigned long valve_busguard_replaced(void) {
    return __atomic_load_n(&pages_replaced, __ATOMIC_RELAXED);
}
