//! Invariant checks shared by the fuzz targets and by the stable test
//! `tests/fuzz_corpus.rs`, which replays the committed seeds and regressions.

pub mod checks;
