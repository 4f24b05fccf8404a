//! Parallelism: the verifier's maps over scoped threads, results in input order. The parallel
//! steps of a run only precompute, once per distinct input, what the sequential checks would
//! compute themselves (entry hashes and decodings, Merkle levels, opened signed messages), so
//! a report is the same for any number of threads.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Below this many items a parallel map runs on the calling thread.
const MIN_CHUNK: usize = 64;

/// Maps `0..n` with `f` on up to `threads` scoped threads (dynamic chunks, results in order).
/// Each thread has its own state from `init`; the states are returned too.
pub(super) fn par_run<S: Send, U: Send>(
    n: usize,
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) -> U + Sync,
) -> (Vec<U>, Vec<S>) {
    if threads <= 1 || n < 2 * MIN_CHUNK {
        let mut state = init();
        let out = (0..n).map(|i| f(&mut state, i)).collect();
        return (out, vec![state]);
    }
    let chunk = (n / (threads * 32)).max(MIN_CHUNK);
    let chunks = n.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    /// Per worker: the chunks it mapped (chunk index, results), and its state.
    type Done<U, S> = (Vec<(usize, Vec<U>)>, S);
    let workers: Vec<Done<U, S>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(chunks))
            .map(|_| {
                scope.spawn(|| {
                    let mut state = init();
                    let mut done = Vec::new();
                    loop {
                        let c = next.fetch_add(1, Ordering::Relaxed);
                        if c >= chunks {
                            break;
                        }
                        let start = c * chunk;
                        let end = (start + chunk).min(n);
                        done.push((c, (start..end).map(|i| f(&mut state, i)).collect()));
                    }
                    (done, state)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut parts = Vec::with_capacity(chunks);
    let mut states = Vec::with_capacity(workers.len());
    for (done, state) in workers {
        parts.extend(done);
        states.push(state);
    }
    parts.sort_unstable_by_key(|(c, _)| *c);
    let mut out = Vec::with_capacity(n);
    for (_, part) in parts {
        out.extend(part);
    }
    (out, states)
}

/// Runs `f` on each of `0..n` (coarse tasks, one at a time per thread) on up to `threads`
/// threads; results in order.
pub(super) fn par_tasks<U: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> U + Sync,
) -> Vec<U> {
    if threads <= 1 || n < 2 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, U)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(n))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        mine.push((i, f(i)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, u)| u).collect()
}

/// Maps `items` in order on up to `threads` threads.
pub(super) fn par_map<T: Sync, U: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> U + Sync,
) -> Vec<U> {
    par_run(items.len(), threads, || (), |_, i| f(&items[i])).0
}
