/* Drives the fake libcuda the ways CUDA programs reach the launch entry points (run with libvalvegate.so
 * preloaded): by symbol, through dlsym, through cuGetProcAddress[_v2] with the per-thread flag. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

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

int main(int argc, char **argv) {
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
