/* libvalvegate.so: Valve's offline gate at the CUDA driver's launch entry points, for unmodified programs.
 *
 * LD_PRELOAD it into the offline tenant. Before kernel and graph launches it enqueues
 * cuStreamWaitValue32(stream, gate word, GATE_OPEN, EQ) on the control block's gate word, so a closed gate
 * stops the tenant's stream at the next wait. Pacing (VALVE_GATE_EVERY_US=T, default 0; VALVE_GATE_EVERY_N=N,
 * default off): per stream, a launch gets a wait when T us of host time have passed since that stream's last
 * wait, or N launches went without one, whichever comes first; always when the host sees the gate closed; T=0
 * and N unset: before every launch. So the work a stream can run past a gate that closes is what its host
 * issued in T us (about T us of GPU work when the host keeps pace with the GPU; more when it runs ahead). It catches launches resolved by symbol, through dlsym (cuBLASLt
 * asks libcuda by name) and through cuGetProcAddress[_v2] (the CUDA runtime and cuBLAS), per-thread-stream
 * variants included. Launches into a capturing stream are not gated (a wait there could break the capture): the
 * graph is gated when it launches. The arbiter's heartbeat lease opens a closed gate if the arbiter died.
 * Optional bound (VALVE_GATE_QUEUE_AHEAD=N): the host waits while N gate waits are queued that the GPU has
 * not reached. Any problem with the control block: one line on stderr, and the process runs ungated.
 * Enforcement: when gating starts (the first launch with a context), it writes getpid() into offline_pid, as the
 * Python Gate does, so the arbiter samples and pauses this process; several gated processes on one block: the
 * last one to start launching wins (helpers that never launch, a shell or a compiler, never publish).
 *
 * Offsets of the control block come from valve/runtime/control.py (the build passes them as -D flags).
 * No CUDA headers: the few driver types are declared here. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#ifndef OFF_GATE
#error "build with valve/preload/build.py (it passes the control block offsets)"
#endif

typedef int CUresult;
typedef void *CUstream, *CUfunction, *CUgraphExec, *CUcontext, *CUevent;
typedef unsigned long long CUdeviceptr;
typedef struct {
    unsigned gx, gy, gz, bx, by, bz, shmem;
    CUstream stream;
    void *attrs;
    unsigned nattrs;
} CUlaunchConfig;

#define CU_OK 0
#define CU_NOT_READY 600
#define CU_ALREADY_REGISTERED 712
#define CU_STREAM_PER_THREAD ((CUstream)0x2)
#define CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM 2ULL
#define CU_STREAM_WAIT_VALUE_EQ 1u
#define CU_MEMHOSTREGISTER_PORTABLE_DEVICEMAP 3u
#define CU_EVENT_DISABLE_TIMING 2u
#define CU_CAPTURE_NONE 0
#define GATE_OPEN 1u
#define TMPFS_MAGIC 0x01021994
#define DEFAULT_LEASE_NS 1000000000ULL
#define RING 64
#define DEFAULT_EVERY_US 0  /* a wait before every launch: on the H200 pacing at 100 us cost gated online p99
                              * far more (x3.10 against x1.80 of alone, eager) than it saved offline */
#define STREAMS 256           /* streams paced one by one; more than that: every launch of the others waits */

/* ---- control block -------------------------------------------------------------------------------------- */
static volatile char *cb;  /* NULL: ungated */
#define U32(off) ((volatile uint32_t *)(cb + (off)))
#define U64(off) ((volatile uint64_t *)(cb + (off)))

static void say(const char *msg, const char *path) {
    fprintf(stderr, "valvegate: %s%s%s: this process runs ungated\n", path ? path : "", path ? ": " : "", msg);
}

static const char *control_path(char *buf, size_t n) {
    const char *p = getenv("VALVE_GATE_CONTROL");
    if (p && *p) return p;
    const char *uuid = getenv("VALVE_GPU_UUID");
    if (!uuid || !*uuid) return NULL;
    const char *dir = getenv("VALVE_RUNTIME_DIR");
    size_t ulen = strcspn(uuid, ",");  /* several GPUs: the first one's block */
    snprintf(buf, n, "%s/%.*s/control", dir && *dir ? dir : "/var/run/valve", (int)ulen, uuid);
    return buf;
}

static void map_control(void) {
    char buf[4096], why[160];
    const char *path = control_path(buf, sizeof buf);
    if (!path) { say("neither VALVE_GATE_CONTROL nor VALVE_GPU_UUID is set", NULL); return; }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) { snprintf(why, sizeof why, "no control block (%s)", strerror(errno)); say(why, path); return; }
    struct stat st;
    struct statfs fs;
    if (fstat(fd, &st) != 0 || st.st_size != FILE_SIZE) {
        snprintf(why, sizeof why, "size %lld bytes, expected %d: not a Valve control block", (long long)st.st_size,
                 FILE_SIZE);
        say(why, path); close(fd); return;
    }
    if (fstatfs(fd, &fs) != 0 || fs.f_type != TMPFS_MAGIC) {
        say("not on tmpfs (CUDA cannot map a page of a disk-backed file)", path); close(fd); return;
    }
    void *m = mmap(NULL, FILE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) { say("mmap failed", path); return; }
    volatile char *c = m;
    uint32_t magic = *(volatile uint32_t *)(c + OFF_MAGIC), ver = *(volatile uint32_t *)(c + OFF_VERSION),
             size = *(volatile uint32_t *)(c + OFF_SIZE);
    if (magic != MAGIC || ver != VERSION || size != FILE_SIZE) {
        snprintf(why, sizeof why, "magic %#x version %u size %u, this library reads magic %#x version %d size %d",
                 magic, ver, size, MAGIC, VERSION, FILE_SIZE);
        say(why, path); munmap(m, FILE_SIZE); return;
    }
    cb = c;
}

/* ---- the real driver ------------------------------------------------------------------------------------ */
typedef void *(*dlsym_t)(void *, const char *);
static dlsym_t real_dlsym;

static void find_dlsym(void) {
    static const char *versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.0", NULL};
    for (int i = 0; !real_dlsym && versions[i]; i++) real_dlsym = (dlsym_t)dlvsym(RTLD_NEXT, "dlsym", versions[i]);
}

static void *libcuda(void) {
    static void *h;
    if (!h) h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (!h) h = dlopen("libcuda.so.1", RTLD_LAZY);
    return h;
}

static void *cuda_sym(const char *name) {
    void *p = real_dlsym(RTLD_NEXT, name);
    if (!p && libcuda()) p = real_dlsym(libcuda(), name);
    return p;
}

/* The launch entry points, each with its own wrapper (the per-thread ones read a NULL stream differently). */
enum { LK, LK_PT, LKEX, LKEX_PT, LCK, LCK_PT, GL, GL_PT, NLAUNCH };
static const char *launch_names[NLAUNCH] = {
    "cuLaunchKernel", "cuLaunchKernel_ptsz", "cuLaunchKernelEx", "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel_ptsz", "cuGraphLaunch", "cuGraphLaunch_ptsz"};
static void *real_launch[NLAUNCH];

static CUresult (*p_wait)(CUstream, CUdeviceptr, uint32_t, unsigned);
static CUresult (*p_register)(void *, size_t, unsigned);
static CUresult (*p_devptr)(CUdeviceptr *, void *, unsigned);
static CUresult (*p_ctx)(CUcontext *);
static CUresult (*p_capturing)(CUstream, int *);
static CUresult (*p_event_create)(CUevent *, unsigned);
static CUresult (*p_event_record)(CUevent, CUstream);
static CUresult (*p_event_query)(CUevent);

/* ---- lazy setup at the first launch with a context ------------------------------------------------------- */
static pthread_mutex_t setup_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int state;  /* 0: not yet, 1: gating, -1: off */
static CUdeviceptr gate_dptr;
static int queue_ahead;  /* 0: no bound */

static void *sym2(const char *a, const char *b) { void *p = cuda_sym(a); return p ? p : cuda_sym(b); }

static int setup(void) {
    if (state) return state;
    pthread_mutex_lock(&setup_lock);
    if (!state) {
        CUcontext ctx = NULL;
        p_ctx = cuda_sym("cuCtxGetCurrent");
        p_wait = sym2("cuStreamWaitValue32_v2", "cuStreamWaitValue32");
        p_register = sym2("cuMemHostRegister_v2", "cuMemHostRegister");
        p_devptr = sym2("cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer");
        p_capturing = cuda_sym("cuStreamIsCapturing");
        p_event_create = sym2("cuEventCreate", "cuEventCreate");
        p_event_record = sym2("cuEventRecord", "cuEventRecord");
        p_event_query = sym2("cuEventQuery", "cuEventQuery");
        if (!p_ctx || !p_wait || !p_register || !p_devptr || !p_capturing) {
            say("the driver lacks cuStreamWaitValue32, cuMemHostRegister or cuStreamIsCapturing", NULL);
            state = -1;
        } else if (p_ctx(&ctx) != CU_OK || !ctx) {
            /* no context yet: try again at the next launch */
        } else {
            CUresult r = p_register((void *)cb, FILE_SIZE, CU_MEMHOSTREGISTER_PORTABLE_DEVICEMAP);
            CUdeviceptr d = 0;
            if ((r == CU_OK || r == CU_ALREADY_REGISTERED) && p_devptr(&d, (void *)cb, 0) == CU_OK) {
                gate_dptr = d + OFF_GATE;
                const char *q = getenv("VALVE_GATE_QUEUE_AHEAD");
                if (q && *q) queue_ahead = strcmp(q, "published") == 0 ? -1 : atoi(q);
                if (queue_ahead && (!p_event_create || !p_event_record || !p_event_query)) queue_ahead = 0;
                /* the arbiter's enforcement samples (NVML) and pauses (SIGSTOP) the pid published here */
                __atomic_store_n((uint64_t *)U64(OFF_OFFLINE_PID), (uint64_t)getpid(), __ATOMIC_RELAXED);
                state = 1;
            } else {
                char why[96];
                snprintf(why, sizeof why, "cuMemHostRegister of the control block failed (CUDA error %d)", r);
                say(why, NULL);
                state = -1;
            }
        }
    }
    pthread_mutex_unlock(&setup_lock);
    return state;
}

/* ---- lease and queue-ahead ------------------------------------------------------------------------------ */
static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);  /* Python's time.monotonic_ns(): the arbiter's heartbeat clock */
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static void check_lease(void) {
    uint32_t g = *U32(OFF_GATE);
    if (g == GATE_OPEN) return;
    uint64_t lease = *U64(OFF_LEASE_NS), hb = *U64(OFF_HEARTBEAT_NS), now = now_ns();
    if (!lease) lease = DEFAULT_LEASE_NS;
    if (now > hb && now - hb > lease &&
        __atomic_compare_exchange_n((uint32_t *)U32(OFF_GATE), &g, GATE_OPEN, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_add((uint64_t *)U64(OFF_FORCED_OPENS), 1, __ATOMIC_RELAXED);
        fprintf(stderr, "valvegate: arbiter heartbeat is %llu ms old (lease %llu ms) with the gate closed: "
                "opening it\n", (unsigned long long)((now - hb) / 1000000), (unsigned long long)(lease / 1000000));
    }
}

static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static CUevent ring[RING];
static unsigned ring_head, ring_len;

static int bound(void) {
    int q = queue_ahead;
    if (q < 0) q = (int)*U64(OFF_QUEUE_AHEAD);  /* "published": what the arbiter's RuntimeSpec says */
    return q < 1 ? 0 : q > RING ? RING : q;
}

/* ---- pacing: which launches get a wait ---------------------------------------------------------------- */
static uint64_t every_ns = DEFAULT_EVERY_US * 1000ULL;  /* 0: no time interval */
static unsigned long every_n;                          /* 0: no launch-count bound */
static pthread_mutex_t pace_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { CUstream s; int used; unsigned long since; uint64_t last_ns; } paced[STREAMS];

/* A non-negative whole number from the environment, else the default (one line on stderr if it was bad). */
static unsigned long env_count(const char *name, unsigned long dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    char *end;
    errno = 0;
    unsigned long x = strtoul(v, &end, 10);
    if (errno || *end || *v == '-') {
        fprintf(stderr, "valvegate: %s=%s is not a whole number >= 0: using %lu\n", name, v, dflt);
        return dflt;
    }
    return x;
}

/* 1 if the launch about to go on stream s gets a wait; then the stream's interval restarts. */
static int wait_due(CUstream s) {
    if (!every_ns && every_n <= 1) return 1;  /* every launch */
    int closed = *U32(OFF_GATE) != GATE_OPEN;  /* as the host sees it: hold this launch, interval or not */
    uint64_t now = now_ns();
    uintptr_t k = (uintptr_t)s;
    unsigned h = (unsigned)((k >> 4) ^ (k >> 12) ^ k) % STREAMS;
    int due = 1;
    pthread_mutex_lock(&pace_lock);
    for (unsigned i = 0; i < STREAMS; i++) {
        unsigned j = (h + i) % STREAMS;
        if (paced[j].used && paced[j].s != s) continue;
        if (!paced[j].used) {  /* the stream's first launch: a wait */
            paced[j].used = 1;
            paced[j].s = s;
        } else {
            due = closed || (every_ns && now - paced[j].last_ns >= every_ns) ||
                  (every_n && paced[j].since + 1 >= every_n);
        }
        if (due) {
            paced[j].since = 0;
            paced[j].last_ns = now;
        } else {
            paced[j].since++;
        }
        break;
    }
    pthread_mutex_unlock(&pace_lock);
    return due;  /* table full: every launch of an untracked stream waits */
}

/* Wait (host) until fewer than the bound of gate waits are queued past the GPU; then remember this one. */
static void throttle_and_mark(CUstream s) {
    int q = bound();
    if (!q) return;
    pthread_mutex_lock(&ring_lock);
    int waited = 0;
    while (ring_len >= (unsigned)q) {
        CUresult r = p_event_query(ring[ring_head]);
        if (r == CU_NOT_READY) {
            waited = 1;
            check_lease();
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
            continue;
        }
        ring_head = (ring_head + 1) % RING;  /* done (or an error: do not wait on it) */
        ring_len--;
    }
    if (waited) __atomic_fetch_add((uint64_t *)U64(OFF_PRELOAD_THROTTLED), 1, __ATOMIC_RELAXED);
    unsigned slot = (ring_head + ring_len) % RING;
    if (!ring[slot] && p_event_create(&ring[slot], CU_EVENT_DISABLE_TIMING) != CU_OK) ring[slot] = NULL;
    if (ring[slot] && p_event_record(ring[slot], s) == CU_OK) ring_len++;
    pthread_mutex_unlock(&ring_lock);
}

/* Before a launch on stream s: the gate wait (and the bound) when one is due, unless the stream is capturing.
 * Launches that get no wait cost a clock read and a lock, no driver call. */
static void before_launch(CUstream s, int per_thread) {
    if (!cb) return;
    __atomic_fetch_add((uint64_t *)U64(OFF_PRELOAD_LAUNCHES), 1, __ATOMIC_RELAXED);
    if (setup() != 1) return;
    if (per_thread && s == NULL) s = CU_STREAM_PER_THREAD;
    if (!wait_due(s)) return;
    int cap = CU_CAPTURE_NONE;
    if (p_capturing(s, &cap) != CU_OK || cap != CU_CAPTURE_NONE) {
        __atomic_fetch_add((uint64_t *)U64(OFF_PRELOAD_CAPTURED), 1, __ATOMIC_RELAXED);
        return;
    }
    check_lease();
    if (p_wait(s, gate_dptr, GATE_OPEN, CU_STREAM_WAIT_VALUE_EQ) == CU_OK)
        __atomic_fetch_add((uint64_t *)U64(OFF_PRELOAD_WAITS), 1, __ATOMIC_RELAXED);
    throttle_and_mark(s);
}

/* ---- the wrappers --------------------------------------------------------------------------------------- */
typedef CUresult (*lk_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                         void **, void **);
typedef CUresult (*lkex_t)(const CUlaunchConfig *, CUfunction, void **, void **);
typedef CUresult (*lck_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                          void **);
typedef CUresult (*gl_t)(CUgraphExec, CUstream);

static void *real(int i) {
    if (!real_launch[i]) real_launch[i] = cuda_sym(launch_names[i]);
    return real_launch[i];
}

#define LK_BODY(I, PT)                                                                                          \
    (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned sh,   \
     CUstream s, void **p, void **e) {                                                                          \
        before_launch(s, PT);                                                                                   \
        return ((lk_t)real(I))(f, gx, gy, gz, bx, by, bz, sh, s, p, e);                                         \
    }
#define LKEX_BODY(I, PT)                                                                                        \
    (const CUlaunchConfig *c, CUfunction f, void **p, void **e) {                                               \
        before_launch(c ? c->stream : NULL, PT);                                                                \
        return ((lkex_t)real(I))(c, f, p, e);                                                                   \
    }
#define LCK_BODY(I, PT)                                                                                         \
    (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned sh,   \
     CUstream s, void **p) {                                                                                    \
        before_launch(s, PT);                                                                                   \
        return ((lck_t)real(I))(f, gx, gy, gz, bx, by, bz, sh, s, p);                                           \
    }
#define GL_BODY(I, PT)                                                                                          \
    (CUgraphExec g, CUstream s) {                                                                               \
        before_launch(s, PT);                                                                                   \
        return ((gl_t)real(I))(g, s);                                                                           \
    }

#define EXPORT __attribute__((visibility("default")))
EXPORT CUresult cuLaunchKernel LK_BODY(LK, 0)
EXPORT CUresult cuLaunchKernel_ptsz LK_BODY(LK_PT, 1)
EXPORT CUresult cuLaunchKernelEx LKEX_BODY(LKEX, 0)
EXPORT CUresult cuLaunchKernelEx_ptsz LKEX_BODY(LKEX_PT, 1)
EXPORT CUresult cuLaunchCooperativeKernel LCK_BODY(LCK, 0)
EXPORT CUresult cuLaunchCooperativeKernel_ptsz LCK_BODY(LCK_PT, 1)
EXPORT CUresult cuGraphLaunch GL_BODY(GL, 0)
EXPORT CUresult cuGraphLaunch_ptsz GL_BODY(GL_PT, 1)

static void *wrappers[NLAUNCH] = {
    (void *)cuLaunchKernel, (void *)cuLaunchKernel_ptsz, (void *)cuLaunchKernelEx, (void *)cuLaunchKernelEx_ptsz,
    (void *)cuLaunchCooperativeKernel, (void *)cuLaunchCooperativeKernel_ptsz, (void *)cuGraphLaunch,
    (void *)cuGraphLaunch_ptsz};

static int launch_index(const char *name) {
    for (int i = 0; i < NLAUNCH; i++)
        if (strcmp(name, launch_names[i]) == 0) return i;
    return -1;
}

/* A resolved launch entry point: remember the real one, hand out the wrapper. (dlsym and cuGetProcAddress may
 * return different addresses for one entry point; either does the same, the first found is called.) */
static void *swap(int i, void *found) {
    if (!found || i < 0) return found;
    if (found == wrappers[i]) return found;  /* a library that binds to our export: never call ourselves */
    if (!real_launch[i]) real_launch[i] = found;
    return wrappers[i];
}

/* ---- cuGetProcAddress (CUDA >= 11.3 resolves the driver through it) -------------------------------------- */
typedef CUresult (*gpa1_t)(const char *, void **, int, uint64_t);
typedef CUresult (*gpa2_t)(const char *, void **, int, uint64_t, void *);
static gpa1_t real_gpa1;
static gpa2_t real_gpa2;
EXPORT CUresult cuGetProcAddress(const char *, void **, int, uint64_t);
EXPORT CUresult cuGetProcAddress_v2(const char *, void **, int, uint64_t, void *);

static void after_proc_address(const char *sym, void **pfn, int version, uint64_t flags) {
    if (!sym || !pfn || !*pfn) return;
    if (strcmp(sym, "cuGetProcAddress") == 0) {  /* version >= 12000 gets the _v2 function */
        if (version >= 12000) {
            if (!real_gpa2) real_gpa2 = (gpa2_t)*pfn;
            *pfn = (void *)cuGetProcAddress_v2;
        } else {
            if (!real_gpa1) real_gpa1 = (gpa1_t)*pfn;
            *pfn = (void *)cuGetProcAddress;
        }
        return;
    }
    int i = launch_index(sym);
    if (i >= 0 && !(i & 1) && (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)) i++;  /* the _ptsz one */
    *pfn = swap(i, *pfn);
}

EXPORT CUresult cuGetProcAddress(const char *sym, void **pfn, int version, uint64_t flags) {
    if (!real_gpa1) real_gpa1 = (gpa1_t)cuda_sym("cuGetProcAddress");
    if (!real_gpa1) return 500; /* CUDA_ERROR_NOT_FOUND */
    CUresult r = real_gpa1(sym, pfn, version, flags);
    if (r == CU_OK) after_proc_address(sym, pfn, version, flags);
    return r;
}

EXPORT CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int version, uint64_t flags, void *status) {
    if (!real_gpa2) real_gpa2 = (gpa2_t)cuda_sym("cuGetProcAddress_v2");
    if (!real_gpa2) return 500;
    CUresult r = real_gpa2(sym, pfn, version, flags, status);
    if (r == CU_OK) after_proc_address(sym, pfn, version, flags);
    return r;
}

/* ---- dlsym: cuBLASLt and others ask libcuda for these by name -------------------------------------------- */
EXPORT void *dlsym(void *handle, const char *name) {
    if (!real_dlsym) find_dlsym();
    if (!real_dlsym) return NULL;
    /* A tail call, so glibc sees the caller's return address: RTLD_NEXT stays relative to the caller. */
    if (handle == RTLD_NEXT || name[0] != 'c' || name[1] != 'u') return real_dlsym(handle, name);
    void *p = real_dlsym(handle, name);
    if (!p) return p;
    if (strcmp(name, "cuGetProcAddress") == 0) {
        if (!real_gpa1) real_gpa1 = (gpa1_t)p;
        return (void *)cuGetProcAddress;
    }
    if (strcmp(name, "cuGetProcAddress_v2") == 0) {
        if (!real_gpa2) real_gpa2 = (gpa2_t)p;
        return (void *)cuGetProcAddress_v2;
    }
    return swap(launch_index(name), p);
}

__attribute__((constructor)) static void init(void) {
    find_dlsym();
    if (getenv("VALVE_GATE_OFF")) return;  /* same binary, no gating: the overhead baseline */
    map_control();
    if (!cb) return;
    every_ns = env_count("VALVE_GATE_EVERY_US", DEFAULT_EVERY_US) * 1000ULL;
    every_n = env_count("VALVE_GATE_EVERY_N", 0);
}
