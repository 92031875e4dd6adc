/* Drives the fake libcuda the ways CUDA programs reach the launch entry points (run with libvalvegate.so
 * preloaded): by symbol, through dlsym, through cuGetProcAddress[_v2] with the per-thread flag.
 *
 * "script OP...": launches and clock steps for the pacing tests. Ls: cuLaunchKernel on stream s (hex); Tn: the
 * clock moves n us; Gv: the gate word becomes v (the block at VALVE_GATE_CONTROL, offset PROBE_GATE_OFFSET).
 * With FAKE_CLOCK_START_NS set, this program's clock_gettime (exported, -rdynamic: the preloaded library binds
 * to it) returns that time plus the steps, so the tests do not depend on how fast the machine runs. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t fake_ns;  /* 0: the real clock */

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (!fake_ns) return (int)syscall(SYS_clock_gettime, id, ts);
    ts->tv_sec = (time_t)(fake_ns / 1000000000ULL);
    ts->tv_nsec = (long)(fake_ns % 1000000000ULL);
    return 0;
}

typedef int (*lk_t)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **,
                    void **);
typedef int (*lck_t)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **);
typedef struct { unsigned gx, gy, gz, bx, by, bz, shmem; void *stream; void *attrs; unsigned nattrs; } Cfg;
typedef int (*lkex_t)(const Cfg *, void *, void **, void **);
typedef int (*gl_t)(void *, void *);
typedef int (*gpa2_t)(const char *, void **, int, uint64_t, void *);
typedef int (*gpa1_t)(const char *, void **, int, uint64_t);

extern int cuLaunchKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *,
                          void **, void **);  /* linked: resolved by symbol */

static int script(int argc, char **argv) {
    const char *start = getenv("FAKE_CLOCK_START_NS"), *ctl = getenv("VALVE_GATE_CONTROL"),
               *off = getenv("PROBE_GATE_OFFSET");
    if (start) fake_ns = strtoull(start, NULL, 10);
    volatile uint32_t *gate = NULL;
    if (ctl && off) {
        int fd = open(ctl, O_RDWR);
        char *m = fd < 0 ? MAP_FAILED : mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED) gate = (volatile uint32_t *)(m + atoi(off));
    }
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i] + 1;
        switch (argv[i][0]) {
        case 'L': cuLaunchKernel(0, 1, 1, 1, 1, 1, 1, 0, (void *)strtoull(a, NULL, 16), 0, 0); break;
        case 'T': fake_ns += strtoull(a, NULL, 10) * 1000ULL; break;
        case 'G': if (!gate) { printf("no gate word\n"); return 2; } *gate = (uint32_t)atoi(a); break;
        default: printf("bad op %s\n", argv[i]); return 2;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "script") == 0) return script(argc, argv);
    int n = argc > 1 ? 4 : 1;  /* "many": a few launches in a row, for the queue-ahead bound */
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) { printf("no libcuda: %s\n", dlerror()); return 2; }
    for (int i = 0; i < n; i++) cuLaunchKernel(0, 1, 1, 1, 1, 1, 1, 0, (void *)0x10, 0, 0);
    if (n > 1) return 0;
    ((lk_t)dlsym(h, "cuLaunchKernel"))(0, 1, 1, 1, 1, 1, 1, 0, (void *)0x11, 0, 0);
    ((lck_t)dlsym(h, "cuLaunchCooperativeKernel"))(0, 1, 1, 1, 1, 1, 1, 0, (void *)0x12, 0);
    gpa2_t gpa2 = (gpa2_t)dlsym(h, "cuGetProcAddress_v2");
    void *p = NULL;
    gpa2("cuLaunchKernel", &p, 12000, 2, NULL);
    ((lk_t)p)(0, 1, 1, 1, 1, 1, 1, 0, NULL, 0, 0);  /* per-thread default stream */
    gpa2("cuGetProcAddress", &p, 12000, 0, NULL);
    gpa2_t again = (gpa2_t)p;
    again("cuLaunchKernelEx", &p, 12000, 0, NULL);
    Cfg c = {1, 1, 1, 1, 1, 1, 0, (void *)0x22, 0, 0};
    ((lkex_t)p)(&c, 0, 0, 0);
    gpa1_t gpa1 = (gpa1_t)dlsym(h, "cuGetProcAddress");
    gpa1("cuGraphLaunch", &p, 11030, 2);
    ((gl_t)p)((void *)1, (void *)0x33);
    ((lk_t)dlsym(h, "cuLaunchKernel"))(0, 1, 1, 1, 1, 1, 1, 0, (void *)0xCA9, 0, 0);  /* capturing stream */
    void *(*self)(void) = (void *(*)(void))dlsym(h, "fake_cuMemAlloc");
    void *alloc = dlsym(h, "cuMemAlloc_v2");
    gpa2("cuMemAlloc", &p, 12000, 0, NULL);
    printf("passthrough %d %d\n", alloc == self(), p == self());
    /* RTLD_NEXT is relative to this program (the next definition is the preloaded one), not to the library */
    printf("next %d\n", dlsym(RTLD_NEXT, "cuLaunchKernel") == (void *)cuLaunchKernel);
    return 0;
}
