/*
 * Threads for the CPU kernels. Every kernel runs its work items through parallel_for / parallel_run: in
 * chunks on OpenMP's threads, or in the caller's thread (a serial build, a forked child, helpers that took
 * no chunk of the last calls). Work items take their scratch memory from thread_scratch.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* ---- threads ---------------------------------------------------------------------------------- */
/*
 * The work of a call is cut into chunks that the threads take from one shared counter, on OpenMP's
 * runtime: torch's own (libgomp.so.1 is loaded once per process), so torch's ops and ours run on the
 * same threads and never compete for the cores between them.
 *
 * Why chunks and not OpenMP's static split: on a machine shared with another busy process, one of our
 * threads is often descheduled. With half the rows each, the other finished its half and waited for it,
 * and calls took several times longer (benchmarks/README.md, "A shared machine"). Now whoever runs takes
 * the next chunk, and a descheduled thread holds back only the chunk it took.
 *
 * An OpenMP region also ends only when every thread of it has run at least once. When the other
 * threads took no chunk of a call (another process had their cores), the next few calls run in the
 * caller's thread alone instead of waiting for them (see SERIAL_AFTER_IDLE_HELPERS).
 *
 * Which thread computes a chunk never changes a result: each output is written by one chunk, whose
 * code does not depend on the thread.
 *
 * A child forked after the threads ran (a DataLoader worker, a pre-forking server) cannot use them:
 * libgomp would wait for threads the child does not have. There the kernels run in the caller's thread.
 */
#define CHUNKS_PER_THREAD 8   /* small enough to balance, large enough that taking one costs nothing */

typedef void (*range_fn)(void *ctx, int begin, int end);

static volatile int in_forked_child = 0;
static void note_fork(void) { in_forked_child = 1; }
__attribute__((constructor)) static void watch_forks(void) { pthread_atfork(NULL, NULL, note_fork); }

/* After a call in which the other threads took no chunk (all descheduled: another process has the
 * cores), the next calls run in the caller's thread alone: waiting for them at the end of a parallel
 * region would cost a time slice of the other process. Then threads are tried again. */
#ifdef _OPENMP
#define SERIAL_AFTER_IDLE_HELPERS 8
static _Atomic int serial_calls_left = 0;
#endif

/* fn(ctx, begin, end) over [0, items), in chunks, on up to `nthreads` threads. `brief`: a call short
 * enough to end before a sleeping helper thread wakes up (attention's, tens of microseconds), so that
 * its caller taking every chunk says nothing about the helpers: it neither starts the serial calls nor
 * counts them down. (Counted, attention's calls put the linears of a server's prefill on one thread:
 * with libgomp's short spin (openmp.py) the helpers sleep between calls, and a prompt's first token
 * came about 1.4x later.) */
static void parallel_run(int items, int nthreads, range_fn fn, void *ctx, int brief) {
    if (items <= 0) return;
    if (nthreads > items) nthreads = items;
#ifdef _OPENMP
    if (nthreads > 1 && !in_forked_child && atomic_load_explicit(&serial_calls_left, memory_order_relaxed) <= 0) {
        int grain = items / (nthreads * CHUNKS_PER_THREAD);
        grain = grain < 1 ? 1 : grain;
        const int chunks = (items + grain - 1) / grain;
        _Atomic int next = 0, by_caller = 0;
#pragma omp parallel num_threads(nthreads)
        {
            int taken = 0;
            for (int c; (c = atomic_fetch_add_explicit(&next, 1, memory_order_relaxed)) < chunks; taken++)
                fn(ctx, c * grain, (c + 1) * grain < items ? (c + 1) * grain : items);
            if (omp_get_thread_num() == 0) by_caller = taken;
        }
        if (by_caller == chunks && !brief)
            atomic_store_explicit(&serial_calls_left, SERIAL_AFTER_IDLE_HELPERS, memory_order_relaxed);
        return;
    }
    if (!brief) atomic_fetch_sub_explicit(&serial_calls_left, 1, memory_order_relaxed);
#else
    (void)brief;
#endif
    fn(ctx, 0, items);
}

static void parallel_for(int items, int nthreads, range_fn fn, void *ctx) { parallel_run(items, nthreads, fn, ctx, 0); }

/* Each thread's scratch buffer (weights widened or rearranged for a work item, attention's scores), kept between calls: a
 * fresh malloc of a few hundred KB is an mmap whose pages fault in again on every call. Freed when its
 * thread exits. One user at a time per thread: a work item takes it and gives it back. */
typedef struct {
    void *data;
    size_t size;
} scratch_t;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void free_scratch(void *p) {
    free(((scratch_t *)p)->data);
    free(p);
}

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free_scratch); }

static void *thread_scratch(size_t bytes) {
    pthread_once(&scratch_once, make_scratch_key);
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (!s) {
        s = (scratch_t *)calloc(1, sizeof(scratch_t));
        pthread_setspecific(scratch_key, s);
    }
    if (bytes > s->size) {
        free(s->data);
        s->data = malloc(bytes);
        s->size = s->data ? bytes : 0;
    }
    return s->data;
}
