/* CPU copies of byte runs shared among threads that take chunks as they come (copies.py).
 *
 * A job is one int64 array:
 *
 *     [0] next chunk to take     [1] helpers inside the job     [2] runs     [3] chunk bytes
 *     [4] 1: stream the stores past the caches     [5 + 3 i ...] run i: target, source, bytes
 *
 * Run i is cut into ceil(bytes / chunk) chunks, numbered after those of the runs before it. The
 * caller and its helper threads each call copy_job_run on the same job; each takes the next chunk
 * until none is left. Nobody waits for a thread that has not started: a helper scheduled late finds
 * no chunk left and returns without touching the job's memory. The caller returns once the helpers
 * that did start have finished their last chunk, so every byte has landed when it returns.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define STREAM_STORES 1
#define RELAX() _mm_pause()
#else
#define STREAM_STORES 0
#define RELAX() ((void)0)
#endif

enum { NEXT, HELPERS, RUNS, CHUNK, STREAM, HEADER };
/* How long the caller spins on a helper's last chunk before it yields the core instead. */
enum { SPINS_BEFORE_YIELD = 1000 };

#if STREAM_STORES
/* Non-temporal stores: a large copy's target lines are written without being read first (a third
 * less memory traffic) and without evicting what the caches hold. */
static void stream_copy(char *target, const char *source, int64_t bytes) {
    int64_t head = (int64_t)(-(uintptr_t)target & 63);  /* stream stores need aligned targets */
    if (head > bytes) head = bytes;
    memcpy(target, source, head);
    target += head, source += head, bytes -= head;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 256 <= bytes; i += 256) {
        __m512i a = _mm512_loadu_si512(source + i), b = _mm512_loadu_si512(source + i + 64);
        __m512i c = _mm512_loadu_si512(source + i + 128), d = _mm512_loadu_si512(source + i + 192);
        _mm512_stream_si512((__m512i *)(target + i), a);
        _mm512_stream_si512((__m512i *)(target + i + 64), b);
        _mm512_stream_si512((__m512i *)(target + i + 128), c);
        _mm512_stream_si512((__m512i *)(target + i + 192), d);
    }
#elif defined(__AVX__)
    for (; i + 128 <= bytes; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(source + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(source + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(source + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(source + i + 96));
        _mm256_stream_si256((__m256i *)(target + i), a);
        _mm256_stream_si256((__m256i *)(target + i + 32), b);
        _mm256_stream_si256((__m256i *)(target + i + 64), c);
        _mm256_stream_si256((__m256i *)(target + i + 96), d);
    }
#else
    for (; i + 64 <= bytes; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(source + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(source + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(source + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(source + i + 48));
        _mm_stream_si128((__m128i *)(target + i), a);
        _mm_stream_si128((__m128i *)(target + i + 16), b);
        _mm_stream_si128((__m128i *)(target + i + 32), c);
        _mm_stream_si128((__m128i *)(target + i + 48), d);
    }
#endif
    _mm_sfence();  /* streamed stores are weakly ordered: they land before anyone hears we are done */
    memcpy(target + i, source + i, bytes - i);
}
#endif

static void copy_chunk(char *target, const char *source, int64_t bytes, int64_t stream) {
#if STREAM_STORES
    if (stream) {
        stream_copy(target, source, bytes);
        return;
    }
#endif
    (void)stream;
    memcpy(target, source, bytes);
}

void copy_job_run(int64_t *job, int32_t helper) {
    _Atomic int64_t *next = (_Atomic int64_t *)&job[NEXT];
    _Atomic int64_t *helpers = (_Atomic int64_t *)&job[HELPERS];
    const int64_t runs = job[RUNS], chunk = job[CHUNK], stream = job[STREAM];
    const int64_t *run = job + HEADER;
    /* Counted in before taking a chunk: a caller that found none left then waits for this one. */
    if (helper) atomic_fetch_add(helpers, 1);
    int64_t index = 0, first = 0;  /* the run this thread is in, and the number of its first chunk */
    for (;;) {
        int64_t taken = atomic_fetch_add(next, 1);  /* chunk numbers only grow: runs only advance */
        while (index < runs && taken >= first + (run[3 * index + 2] + chunk - 1) / chunk) {
            first += (run[3 * index + 2] + chunk - 1) / chunk;
            index++;
        }
        if (index >= runs) break;
        int64_t offset = (taken - first) * chunk, bytes = run[3 * index + 2] - offset;
        copy_chunk((char *)(intptr_t)run[3 * index] + offset, (const char *)(intptr_t)run[3 * index + 1] + offset,
                   bytes < chunk ? bytes : chunk, stream);
    }
    if (helper) {
        atomic_fetch_sub(helpers, 1);
        return;
    }
    for (int spins = 0; atomic_load(helpers) > 0; spins++) {
        if (spins < SPINS_BEFORE_YIELD) RELAX();
        else sched_yield();
    }
}
