//! When an instance is passed again after a pass that could not finish:
//! the same schedule for every front end.

use std::time::Duration;

/// A file that does not parse right after an event is read again this often...
pub const BUSY_RETRY: Duration = Duration::from_millis(100);
/// ...this many times, then treated as corrupt (moved aside, rendered fresh).
pub const BUSY_ATTEMPTS: u32 = 5;
/// First wait before a failed write is tried again; doubles up to [`IO_RETRY_MAX`].
pub const IO_RETRY: Duration = Duration::from_millis(250);
/// Longest wait between tries of a failed write.
pub const IO_RETRY_MAX: Duration = Duration::from_secs(30);

/// Wait before the `attempt`th retry (from 1) of a failed write.
pub fn io_retry_delay(attempt: u32) -> Duration {
    (IO_RETRY * 2u32.saturating_pow(attempt.min(8))).min(IO_RETRY_MAX)
}
