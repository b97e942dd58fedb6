//! A progress bar for long passes: on stderr, and only when stderr is a
//! terminal, so logs, pipes and CI output get nothing extra.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::Progress;

/// Fewer instances than this finish before a bar would be worth drawing.
const MIN_INSTANCES: usize = 100;

/// A bar of instances done out of a pass's total; cleared when dropped.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar for a pass over `total` instances, when stderr is a terminal
    /// and the pass is long enough to want one.
    pub fn start(total: usize) -> Option<Bar> {
        if total < MIN_INSTANCES || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(
            Some(total as u64),
            ProgressDrawTarget::stderr_with_hz(10),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed:>4} [{bar:32}] {pos}/{len} instances, {per_sec}, {eta} left",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(Bar(bar))
    }

    /// What the engine calls per instance done.
    pub fn ticker(&self) -> Progress {
        let bar = self.0.clone();
        Progress(Arc::new(move || bar.inc(1)))
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
