//! Continuous batching, reduced to admission: `max_num_seqs` slots; a request generates while
//! it holds one, and the rest wait in arrival order.
//!
//! Invariant: `running` counts live [`Slot`]s and `waiting` counts requests parked in
//! [`Scheduler::admit`], exactly — both are decremented by `Drop`, so a client that goes away
//! (its future or stream dropped) leaves neither count behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, TryAcquireError};

use crate::error::SimError;
use crate::metrics::Gauges;

/// The batch's slots and who holds or waits for them. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    batch: Arc<Batch>,
}

/// A request's place in the running batch; dropping it frees the place for the next waiter.
pub struct Slot {
    batch: Arc<Batch>,
}

struct Batch {
    /// Free slots. Permits are `forget`-ed on admission and given back by [`Slot`]'s `Drop`,
    /// so a slot needs one `Arc` rather than a permit and a counter handle.
    free: Semaphore,
    running: AtomicU64,
    waiting: AtomicU64,
    max_num_seqs: u32,
}

impl Scheduler {
    /// A batch of `max_num_seqs` slots, all free.
    pub fn new(max_num_seqs: u32) -> Self {
        Self {
            batch: Arc::new(Batch {
                free: Semaphore::new(max_num_seqs as usize),
                running: AtomicU64::new(0),
                waiting: AtomicU64::new(0),
                max_num_seqs,
            }),
        }
    }

    /// Waits, first come first served, for a slot.
    pub async fn admit(&self) -> Result<Slot, SimError> {
        let batch = &self.batch;
        // Tokio's semaphore hands freed permits to queued waiters first, so trying first
        // cannot overtake anyone; it only keeps an uncontended request off the waiting gauge.
        match batch.free.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => {
                batch.waiting.fetch_add(1, Ordering::Relaxed);
                let _queued = Queued(&batch.waiting);
                batch.free.acquire().await.map_err(|_| SimError::ShuttingDown)?.forget();
            }
            Err(TryAcquireError::Closed) => return Err(SimError::ShuttingDown),
        }
        batch.running.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { batch: Arc::clone(&self.batch) })
    }

    /// Running and waiting requests now.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            running: self.batch.running.load(Ordering::Relaxed),
            waiting: self.batch.waiting.load(Ordering::Relaxed),
            max_num_seqs: self.batch.max_num_seqs,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Decrement before freeing, so the waiter this wakes never sees `running` above max.
        self.batch.running.fetch_sub(1, Ordering::Relaxed);
        self.batch.free.add_permits(1);
    }
}

/// Counts a request on the waiting gauge for as long as it is parked.
struct Queued<'a>(&'a AtomicU64);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::Poll;

    use futures::poll;

    use super::*;

    #[tokio::test]
    async fn waiters_queue_in_order_and_dropping_frees_the_counts() {
        let scheduler = Scheduler::new(1);
        let first = scheduler.admit().await.unwrap();

        let mut second = pin!(scheduler.admit());
        let mut third = pin!(scheduler.admit());
        assert!(poll!(second.as_mut()).is_pending());
        assert!(poll!(third.as_mut()).is_pending());
        let g = scheduler.gauges();
        assert_eq!((g.running, g.waiting), (1, 2));

        drop(first);
        // The slot went to the first waiter, not the second.
        assert!(poll!(third.as_mut()).is_pending());
        let Poll::Ready(Ok(second)) = poll!(second.as_mut()) else { panic!("second not admitted") };
        let g = scheduler.gauges();
        assert_eq!((g.running, g.waiting), (1, 1));

        drop(second);
        let Poll::Ready(Ok(third)) = poll!(third.as_mut()) else { panic!("third not admitted") };
        drop(third);
        let g = scheduler.gauges();
        assert_eq!((g.running, g.waiting), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_the_queue() {
        let scheduler = Scheduler::new(1);
        let held = scheduler.admit().await.unwrap();
        {
            let mut waiter = pin!(scheduler.admit());
            assert!(poll!(waiter.as_mut()).is_pending());
            assert_eq!(scheduler.gauges().waiting, 1);
        }
        assert_eq!(scheduler.gauges().waiting, 0);
        drop(held);
        let _again = scheduler.admit().await.unwrap();
        assert_eq!(scheduler.gauges().running, 1);
    }
}
