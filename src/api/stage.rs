//! The download stage: requests fetch and decode their input images (references, the /upscale
//! input) here, before they ask for a GPU queue place. A request that waits on slow URLs thus
//! holds a download place, never a queue place, and the queue only holds work the worker can
//! start at once. The stage is bounded on its own (`MAX_CONCURRENT_DOWNLOADS`; full → 503 with
//! Retry-After) so slow peers cannot pile up unbounded memory and sockets either.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engine::QueueFull;

/// Counts the requests in the download stage.
#[derive(Debug)]
pub struct DownloadStage {
    in_flight: Arc<AtomicUsize>,
    capacity: usize,
}

/// A place in the download stage, released when dropped.
#[derive(Debug)]
pub struct DownloadPlace(Arc<AtomicUsize>);

impl Drop for DownloadPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl DownloadStage {
    pub fn new(capacity: usize) -> Self {
        Self {
            in_flight: Arc::default(),
            capacity,
        }
    }

    /// A place, or how full the stage is.
    pub fn enter(&self) -> Result<DownloadPlace, QueueFull> {
        let capacity = self.capacity;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .map(|_| DownloadPlace(self.in_flight.clone()))
            .map_err(|depth| QueueFull { depth, capacity })
    }

    /// Requests downloading now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_released_on_drop() {
        let stage = DownloadStage::new(2);
        let a = stage.enter().unwrap();
        let _b = stage.enter().unwrap();
        assert_eq!(
            stage.enter().unwrap_err(),
            QueueFull {
                depth: 2,
                capacity: 2
            }
        );
        drop(a);
        assert_eq!(stage.in_flight(), 1);
        assert!(stage.enter().is_ok());
    }
}
