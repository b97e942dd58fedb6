//! agent-env-operator: renders the plugins, plugin marketplaces and MCP servers
//! of Claude Code agents into their env dirs, from layered declarations.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod crd;
pub mod crypto;
pub mod engine;
pub mod explain;
pub mod handshake;
pub mod host;
pub mod metrics;
pub mod sidecar;
pub mod state;
pub mod time;

/// An error and its sources, joined with `: `, for one-line messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
pub mod cli;
pub mod report;
