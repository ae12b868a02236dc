//! A small persistent thread pool for the forward pass. [`ThreadPool::for_each`] hands items of
//! a job to whichever threads show up; the caller always works too and, once the items run out,
//! closes the job so a worker that has not joined yet (descheduled on a busy machine) never
//! delays the step: it simply skips that job. Workers spin briefly between jobs (a decode step
//! issues a few hundred jobs microseconds apart, and a sleeping thread takes tens of
//! microseconds to wake), then sleep on a condvar when the engine is idle.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins a worker makes waiting for the next job before it sleeps.
const SPINS_BEFORE_SLEEP: u32 = 1 << 15;
/// `claims` bit that closes a job to late joiners.
const CLOSED: u64 = 1 << 31;
const COUNT_MASK: u64 = CLOSED - 1;

type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// The current job; written by the caller before `claims`/`generation` are published
    /// (Release), read by a worker only after it joined the job (a successful CAS on `claims`).
    job: UnsafeCell<Option<Job<'static>>>,
    generation: AtomicU64,
    /// `generation << 32 | CLOSED? | workers joined`.
    claims: AtomicU64,
    /// Workers that joined the current job and finished it.
    done: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only inside `ThreadPool::for_each` (serialised by `busy`) while no
// worker can be running a job (every joiner of the previous job finished and the job was closed
// to new joiners), and read only by workers that joined the current job.
unsafe impl Sync for Shared {}
// SAFETY: see above; the job reference itself is `Sync`.
unsafe impl Send for Shared {}

/// See the module docs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: Mutex<u32>,
    n: usize,
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one; at least 1).
    pub fn new(threads: usize) -> ThreadPool {
        let n = threads.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            generation: AtomicU64::new(0),
            claims: AtomicU64::new(CLOSED),
            done: AtomicUsize::new(0),
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
            busy: Mutex::new(0),
            n,
        }
    }

    /// Number of threads, the caller included.
    pub fn threads(&self) -> usize {
        self.n
    }

    /// Calls `f(item, thread)` for every item in `0..n_items` exactly once, items handed out
    /// dynamically to the caller (thread 0) and whichever workers join; returns when all are done.
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
        let body = |thread: usize| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_items {
                break;
            }
            f(i, thread);
        };
        self.run(&body);
    }

    /// Runs `f` on the caller (index 0) and on every worker that joins before the caller is done
    /// with its own call; `f` must itself share out the work (see `for_each`).
    fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let mut gen_guard = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        *gen_guard = gen_guard.wrapping_add(1).max(1);
        let gen = *gen_guard as u64;
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only while this call runs: the job is closed to new
        // joiners and every joiner has finished before we clear it and return.
        let job: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(f) };
        // SAFETY: no worker reads `job` now (the previous job was closed and all its joiners
        // finished), and `busy` excludes other callers.
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Ordering::Relaxed);
        s.claims.store(gen << 32, Ordering::Release);
        s.generation.store(gen, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let joined = (s.claims.fetch_or(CLOSED, Ordering::AcqRel) & COUNT_MASK) as usize;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < joined {
            spins += 1;
            if spins < 1024 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: closed, and every joiner finished.
        unsafe { *s.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a CPU worker thread panicked (a kernel invariant was broken)");
        }
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let gen = loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
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
        };
        seen = gen;
        // Join the job unless it is already closed (or a newer one replaced it).
        let mut c = s.claims.load(Ordering::Acquire);
        let joined = loop {
            if c >> 32 != gen || c & CLOSED != 0 {
                break false;
            }
            match s
                .claims
                .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) => c = now,
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: we joined the open job: the caller wrote it before publishing `claims` and
        // keeps it alive until we increment `done`.
        let job = unsafe { *s.job.get() };
        if let Some(f) = job {
            if catch_unwind(AssertUnwindSafe(|| f(idx))).is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.done.fetch_add(1, Ordering::Release);
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
    fn every_item_runs_exactly_once_and_borrows_work() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for n in [0usize, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..200 {
                    pool.for_each(n, &|i, t| {
                        assert!(t < pool.threads());
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                }
                for h in &hits {
                    assert_eq!(h.load(Ordering::Relaxed), 200);
                }
            }
        }
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each(64, &|i, _| {
                if i == 33 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.for_each(10, &|_, _| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
