/* threads: 4 pthreads, each updating its own counter, plus a mutex-protected
 * shared sum.  Steps are paced by two barriers; each worker also sleeps a
 * little (a different time per thread) inside a step, so a checkpoint finds
 * threads in nanosleep, in futex waits (barrier/mutex) and running. */
#include "common.h"
#include <pthread.h>

#define NT 4
#define WORK_ITERS 20000

static int g_steps;
static pthread_barrier_t bar_start, bar_end;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t shared_sum;        /* protected by mu */
static uint64_t counters[NT];      /* counters[i] owned by thread i */
static uint64_t iters[NT];         /* steps done by thread i */

static uint64_t work(uint64_t x, int id, int n)
{
	for (int k = 0; k < WORK_ITERS; k++)
		x = splitmix64(x ^ ((uint64_t)k << 8) ^ (uint64_t)id ^ ((uint64_t)n << 40));
	return x;
}

static void barrier(pthread_barrier_t *b)
{
	int r = pthread_barrier_wait(b);
	if (r != 0 && r != PTHREAD_BARRIER_SERIAL_THREAD)
		fail("pthread_barrier_wait: %s", strerror(r));
}

static void *worker(void *arg)
{
	int id = (int)(intptr_t)arg;
	uint64_t local = splitmix64((uint64_t)id + 1);
	for (int n = 1; n <= g_steps; n++) {
		barrier(&bar_start);
		local = work(local, id, n);
		nap_ms(5 + 7 * id);
		counters[id] = local;
		iters[id]++;
		pthread_mutex_lock(&mu);
		shared_sum += local ^ (uint64_t)n;
		pthread_mutex_unlock(&mu);
		barrier(&bar_end);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	const char *workdir;
	parse_args(argc, argv, &workdir, &g_steps);
	(void)workdir;

	if (pthread_barrier_init(&bar_start, NULL, NT + 1) || pthread_barrier_init(&bar_end, NULL, NT + 1))
		fail("pthread_barrier_init");
	pthread_t th[NT];
	for (int i = 0; i < NT; i++) {
		int r = pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
		if (r)
			fail("pthread_create: %s", strerror(r));
	}

	/* main keeps an independent model of what the workers must compute */
	uint64_t model[NT], model_sum = 0;
	for (int i = 0; i < NT; i++)
		model[i] = splitmix64((uint64_t)i + 1);

	for (int n = 1; n <= g_steps; n++) {
		barrier(&bar_start);
		for (int i = 0; i < NT; i++) {
			model[i] = work(model[i], i, n);
			model_sum += model[i] ^ (uint64_t)n;
		}
		barrier(&bar_end);
		pthread_mutex_lock(&mu);
		uint64_t sum = shared_sum;
		pthread_mutex_unlock(&mu);
		for (int i = 0; i < NT; i++) {
			if (counters[i] != model[i])
				fail("thread %d counter mismatch at step %d", i, n);
			if (iters[i] != (uint64_t)n)
				fail("thread %d did %llu steps, expected %d", i, (unsigned long long)iters[i], n);
			ck_u64(counters[i]);
		}
		if (sum != model_sum)
			fail("shared sum mismatch at step %d", n);
		step_line(n, sum);
		step_pause();
	}

	for (int i = 0; i < NT; i++) {
		int r = pthread_join(th[i], NULL);
		if (r)
			fail("pthread_join: %s", strerror(r));
	}
	result_line();
	return 0;
}
