//! An in-process Kubernetes API server double for tests.
