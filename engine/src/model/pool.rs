//! A small persistent thread pool for the forward pass: `run(f)` calls `f(thread_index)` on every
//! thread (the caller is thread 0) and returns when all are done, so `f` may borrow from the
//! caller's stack. Workers spin briefly between jobs (a decode step issues a few hundred jobs a
//! few microseconds apart, and a sleeping thread takes tens of microseconds to wake), then sleep
//! on a condvar when the engine is idle.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins a worker makes waiting for the next job before it sleeps.
const SPINS_BEFORE_SLEEP: u32 = 1 << 16;

type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// The current job; written by the caller before `generation` is bumped (Release), read by
    /// workers after they see the bump (Acquire).
    job: UnsafeCell<Option<Job<'static>>>,
    generation: AtomicU64,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written by the thread inside `ThreadPool::run` (serialised by `busy`)
// while no worker reads it (all workers have finished the previous generation), and only read
// by workers between seeing a new generation and decrementing `pending`.
unsafe impl Sync for Shared {}
// SAFETY: see above; the job reference itself is `Sync`.
unsafe impl Send for Shared {}

/// See the module docs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: Mutex<()>,
    n: usize,
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one; at least 1).
    pub fn new(threads: usize) -> ThreadPool {
        let n = threads.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            generation: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::new();
        for idx in 1..n {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kvroute-cpu-{idx}"))
                .spawn(move || worker(s, idx));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    tracing::warn!(error = %e, threads = idx, "could not start more CPU threads");
                    break;
                }
            }
        }
        let n = workers.len() + 1;
        ThreadPool {
            shared,
            workers,
            busy: Mutex::new(()),
            n,
        }
    }

    /// Number of threads, the caller included.
    pub fn threads(&self) -> usize {
        self.n
    }

    /// Runs `f(i)` for every thread index `i` in `0..threads()` (0 on the calling thread) and
    /// waits for all of them.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n == 1 {
            f(0);
            return;
        }
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: we wait below until
        // every worker has finished with the job (pending == 0) and clear it before returning,
        // so no worker can observe `f` after it goes out of scope.
        let job: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(f) };
        // SAFETY: no worker reads `job` now: all finished the previous generation (pending was
        // 0 when the previous run returned), and `busy` excludes other callers.
        unsafe { *s.job.get() = Some(job) };
        s.pending.store(self.n - 1, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: all workers are done with this generation.
        unsafe { *s.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a CPU worker thread panicked (a kernel invariant was broken)");
        }
    }

    /// Calls `f(item, thread)` for every item in `0..n_items`, items handed out dynamically so a
    /// thread slowed by other load does not hold the others up.
    pub fn for_each(&self, n_items: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if n_items == 0 {
            return;
        }
        if self.n == 1 || n_items == 1 {
            for i in 0..n_items {
                f(i, 0);
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|thread| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_items {
                break;
            }
            f(i, thread);
        });
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins += 1;
            if spins < SPINS_BEFORE_SLEEP {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst)
            {
                guard = s.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        // SAFETY: the caller wrote the job before bumping the generation we just observed, and
        // keeps it alive until we decrement `pending`.
        let job = unsafe { *s.job.get() };
        if let Some(f) = job {
            if catch_unwind(AssertUnwindSafe(|| f(idx))).is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A raw pointer to an output buffer that parallel jobs write to at disjoint indices.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T, pub usize);
// SAFETY: only used to write disjoint elements from different threads inside `ThreadPool::run`,
// which ends before the buffer's borrow does.
unsafe impl<T: Send> Sync for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub fn new(s: &mut [T]) -> Self {
        SyncPtr(s.as_mut_ptr(), s.len())
    }

    /// A mutable view of `start..start + len`.
    ///
    /// # Safety
    /// No other live reference may overlap this range while the returned slice lives.
    #[inline]
    #[allow(clippy::mut_from_ref)] // disjointness is the caller's documented contract
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.1, "SyncPtr range out of bounds");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// No other thread may access element `i` concurrently.
    #[inline]
    pub unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.1, "SyncPtr index out of bounds");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { self.0.add(i).write(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_and_borrows_work() {
        let pool = ThreadPool::new(3);
        let hits: Vec<AtomicUsize> = (0..pool.threads()).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1000);
        }
        let sum = AtomicUsize::new(0);
        pool.for_each(10_000, &|i, _| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 10_000 * 9_999 / 2);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
