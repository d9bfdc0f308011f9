//! The download stage: requests fetch and decode their input images (references, the /upscale
//! input) here, before they ask for a GPU queue place. A request that waits on slow URLs thus
//! holds a download place, never a queue place, and the queue only holds work the worker can
//! start at once. The stage is bounded on its own (`MAX_CONCURRENT_DOWNLOADS`; full → 503 with
//! Retry-After) so slow peers cannot pile up unbounded memory and sockets either.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::QueueFull;

/// The stage's places: a semaphore of `capacity` permits.
#[derive(Debug)]
pub struct DownloadStage {
    places: Arc<Semaphore>,
    capacity: usize,
}

/// A place in the download stage, released when dropped.
pub type DownloadPlace = OwnedSemaphorePermit;

impl DownloadStage {
    pub fn new(capacity: usize) -> Self {
        Self {
            places: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// A place, or how full the stage is.
    pub fn enter(&self) -> Result<DownloadPlace, QueueFull> {
        self.places
            .clone()
            .try_acquire_owned()
            // The semaphore is never closed: the only failure is "no permits".
            .map_err(|_| QueueFull {
                depth: self.in_flight(),
                capacity: self.capacity,
            })
    }

    /// Requests downloading now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.places.available_permits()
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
