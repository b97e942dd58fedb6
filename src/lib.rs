//! agent-env-operator: renders the plugins, plugin marketplaces and MCP servers
//! of Claude Code agents into their env dirs, from layered declarations.
#![forbid(unsafe_code)]

pub mod crd;
pub mod builtin;
pub mod resolve;
pub mod secrets;
pub mod section;
pub mod shape;
pub mod envdir;
pub mod merge;
pub mod time;
