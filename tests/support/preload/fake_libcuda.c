/* A fake libcuda.so.1 for the libvalvegate tests: the entry points the library touches, logging each call. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef void *CUstream;
typedef struct { unsigned gx, gy, gz, bx, by, bz, shmem; CUstream stream; void *attrs; unsigned nattrs; } Cfg;

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void logf_(const char *fmt, ...) {
    FILE *f = fopen(getenv("FAKE_CUDA_LOG"), "a");
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

#define LK_ARGS void *f, unsigned a, unsigned b, unsigned c, unsigned d, unsigned e, unsigned g, unsigned h, CUstream s
CUresult cuLaunchKernel(LK_ARGS, void **p, void **x) { logf_("launch cuLaunchKernel %p", s); return 0; }
CUresult cuLaunchKernel_ptsz(LK_ARGS, void **p, void **x) { logf_("launch cuLaunchKernel_ptsz %p", s); return 0; }
CUresult cuLaunchKernelEx(const Cfg *c, void *f, void **p, void **x) { logf_("launch cuLaunchKernelEx %p", c->stream); return 0; }
CUresult cuLaunchKernelEx_ptsz(const Cfg *c, void *f, void **p, void **x) { logf_("launch cuLaunchKernelEx_ptsz %p", c->stream); return 0; }
CUresult cuLaunchCooperativeKernel(LK_ARGS, void **p) { logf_("launch cuLaunchCooperativeKernel %p", s); return 0; }
CUresult cuLaunchCooperativeKernel_ptsz(LK_ARGS, void **p) { logf_("launch cuLaunchCooperativeKernel_ptsz %p", s); return 0; }
CUresult cuGraphLaunch(void *g, CUstream s) { logf_("launch cuGraphLaunch %p", s); return 0; }
CUresult cuGraphLaunch_ptsz(void *g, CUstream s) { logf_("launch cuGraphLaunch_ptsz %p", s); return 0; }

CUresult cuCtxGetCurrent(void **ctx) { *ctx = (void *)0xC0; return 0; }
CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags) { logf_("register %zu %u", n, flags); return 0; }
CUresult cuMemHostGetDevicePointer_v2(unsigned long long *d, void *p, unsigned flags) {
    *d = (unsigned long long)(uintptr_t)p; return 0;
}
CUresult cuStreamWaitValue32_v2(CUstream s, unsigned long long addr, uint32_t value, unsigned flags) {
    logf_("wait %p value=%u flags=%u word=%u", s, value, flags, *(volatile uint32_t *)(uintptr_t)addr);
    return 0;
}
/* stream 0xCA9 is capturing */
CUresult cuStreamIsCapturing(CUstream s, int *status) { *status = s == (CUstream)0xCA9; return 0; }

static int queries;
CUresult cuEventCreate(void **e, unsigned flags) { static long n; *e = (void *)(++n); return 0; }
CUresult cuEventRecord(void *e, CUstream s) { logf_("record %p", s); return 0; }
CUresult cuEventQuery(void *e) { logf_("query"); return ++queries % 3 ? 600 : 0; }  /* ready every 3rd query */

CUresult cuMemAlloc_v2(unsigned long long *d, size_t n) { *d = 0x1000; return 0; }

static const struct { const char *name; void *fn, *pt; } table[] = {
    {"cuLaunchKernel", cuLaunchKernel, cuLaunchKernel_ptsz},
    {"cuLaunchKernelEx", cuLaunchKernelEx, cuLaunchKernelEx_ptsz},
    {"cuLaunchCooperativeKernel", cuLaunchCooperativeKernel, cuLaunchCooperativeKernel_ptsz},
    {"cuGraphLaunch", cuGraphLaunch, cuGraphLaunch_ptsz},
    {"cuMemAlloc", cuMemAlloc_v2, cuMemAlloc_v2},
};

CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int version, uint64_t flags, void *status);
CUresult cuGetProcAddress(const char *sym, void **pfn, int version, uint64_t flags) {
    return cuGetProcAddress_v2(sym, pfn, version, flags, NULL);
}
CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int version, uint64_t flags, void *status) {
    logf_("proc %s %llu", sym, (unsigned long long)flags);
    if (strcmp(sym, "cuGetProcAddress") == 0) {
        *pfn = version >= 12000 ? (void *)cuGetProcAddress_v2 : (void *)cuGetProcAddress;
        return 0;
    }
    for (size_t i = 0; i < sizeof table / sizeof *table; i++)
        if (strcmp(sym, table[i].name) == 0) { *pfn = flags & 2 ? table[i].pt : table[i].fn; return 0; }
    *pfn = NULL;
    return 500;
}

void *fake_cuMemAlloc(void) { return (void *)cuMemAlloc_v2; }
