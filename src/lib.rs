//! agent-env-operator: renders the plugins, plugin marketplaces and MCP servers
//! of Claude Code agents into their env dirs, from layered declarations.
#![forbid(unsafe_code)]

pub mod crd;
