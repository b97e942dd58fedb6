//! Declared objects in Claude Code's own JSON shapes, and the checks that
//! apply to those shapes wherever they come from (objects or builtin files).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::crd::{MarketplaceSource, McpServerSpec, RemoteServer};

/// MCP server name Claude Code keeps for itself.
pub const RESERVED_MCP_NAME: &str = "workspace";

static PLUGIN_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[^@\s]+@[^@\s]+$").expect("valid regex"));

/// Whether `id` is `<plugin>@<marketplace>`.
pub fn is_plugin_id(id: &str) -> bool {
    PLUGIN_ID.is_match(id)
}

/// Whether `name` can name a marketplace (`<plugin>@<name>` must stay parseable).
pub fn is_marketplace_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['@', '/']) && !name.contains(char::is_whitespace)
}

/// `{"source": {"source": "<kind>", ...}}` for a declared marketplace source.
pub fn marketplace_entry(source: &MarketplaceSource) -> Value {
    let mut inner = Map::new();
    let mut put = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            inner.insert(k.to_owned(), Value::String(v.clone()));
        }
    };
    let tag = if let Some(g) = &source.github {
        put("repo", Some(&g.repo));
        put("ref", g.git_ref.as_ref());
        put("path", g.path.as_ref());
        "github"
    } else if let Some(g) = &source.git {
        put("url", Some(&g.url));
        put("ref", g.git_ref.as_ref());
        put("path", g.path.as_ref());
        "git"
    } else if let Some(u) = &source.url {
        put("url", Some(&u.url));
        if !u.headers.is_empty() {
            inner.insert("headers".into(), json!(u.headers));
        }
        "url"
    } else if let Some(d) = &source.directory {
        put("path", Some(&d.path));
        "directory"
    } else if let Some(f) = &source.file {
        put("path", Some(&f.path));
        "file"
    } else {
        // Unreachable for validated objects; an empty source is never rendered.
        return json!({ "source": {} });
    };
    let mut source_obj = Map::new();
    source_obj.insert("source".into(), Value::String(tag.into()));
    source_obj.extend(inner);
    json!({ "source": source_obj })
}

/// Whether a marketplace entry has nothing to fetch (`source` missing or `{}`).
pub fn marketplace_source_is_empty(entry: &Value) -> bool {
    match entry.get("source") {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(_) => false,
    }
}

/// The `mcpServers` entry for a declared server, secrets still as placeholders.
pub fn mcp_entry(spec: &McpServerSpec) -> Value {
    let mut out = Map::new();
    if let Some(s) = &spec.stdio {
        out.insert("type".into(), json!("stdio"));
        out.insert("command".into(), json!(s.command));
        if !s.args.is_empty() {
            out.insert("args".into(), json!(s.args));
        }
        if !s.env.is_empty() {
            out.insert("env".into(), json!(s.env));
        }
    } else if let Some((kind, r)) = remote(spec) {
        out.insert("type".into(), json!(kind));
        out.insert("url".into(), json!(r.url));
        if !r.headers.is_empty() {
            out.insert("headers".into(), json!(r.headers));
        }
    }
    if let Some(t) = spec.timeout {
        out.insert("timeout".into(), json!(t));
    }
    Value::Object(out)
}

fn remote(spec: &McpServerSpec) -> Option<(&'static str, &RemoteServer)> {
    spec.http
        .as_ref()
        .map(|r| ("http", r))
        .or_else(|| spec.sse.as_ref().map(|r| ("sse", r)))
}

/// Checks an `mcpServers` entry in Claude Code's shape (used for builtin
/// files; objects are checked by their schema). Returns the offending field
/// and why.
pub fn check_mcp_entry(entry: &Value) -> Result<(), (String, String)> {
    let Some(obj) = entry.as_object() else {
        return Err((String::new(), "must be an object".into()));
    };
    let ty = match obj.get("type") {
        None => "stdio",
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err(("type".into(), "must be a string".into())),
    };
    let required = match ty {
        "stdio" => "command",
        "http" | "sse" => "url",
        other => {
            return Err((
                "type".into(),
                format!("unknown type {other:?}; expected stdio, http or sse"),
            ));
        }
    };
    match obj.get(required) {
        Some(Value::String(s)) if !s.is_empty() => {}
        _ => return Err((required.into(), "must be a non-empty string".into())),
    }
    if let Some(Value::String(cmd)) = obj.get("command")
        && cmd.contains(crate::engine::secrets::PLACEHOLDER_PREFIX)
    {
        return Err((
            "command".into(),
            "secret placeholders are not allowed in command; pass secrets in args or env".into(),
        ));
    }
    if let Some(t) = obj.get("timeout")
        && t.as_u64().is_none_or(|t| t == 0)
    {
        return Err((
            "timeout".into(),
            "must be a positive integer of milliseconds".into(),
        ));
    }
    Ok(())
}

/// Checks an `extraKnownMarketplaces` entry in Claude Code's shape.
pub fn check_marketplace_entry(entry: &Value) -> Result<(), (String, String)> {
    match entry.get("source") {
        Some(Value::Object(src)) => match src.get("source") {
            Some(Value::String(_)) => Ok(()),
            _ => Err((
                "source.source".into(),
                "must name the source kind (github, git, url, directory or file)".into(),
            )),
        },
        _ => Err(("source".into(), "must be an object".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{GithubSource, StdioServer, Target};

    #[test]
    fn plugin_ids() {
        assert!(is_plugin_id("fmt@tools"));
        for bad in ["fmt", "fmt@", "@tools", "a@b@c", "a b@c", "a@b c", ""] {
            assert!(!is_plugin_id(bad), "{bad}");
        }
    }

    #[test]
    fn github_marketplace_is_tagged_by_its_field_name() {
        let src = MarketplaceSource {
            github: Some(GithubSource {
                repo: "o/r".into(),
                git_ref: Some("v1".into()),
                path: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&marketplace_entry(&src)).unwrap(),
            r#"{"source":{"source":"github","repo":"o/r","ref":"v1"}}"#
        );
    }

    #[test]
    fn stdio_server_omits_unset_fields() {
        let spec = McpServerSpec {
            target: Target::default(),
            name: None,
            stdio: Some(StdioServer {
                command: "npx".into(),
                args: vec![],
                env: Default::default(),
            }),
            http: None,
            sse: None,
            timeout: Some(5000),
            enabled: true,
        };
        assert_eq!(
            serde_json::to_string(&mcp_entry(&spec)).unwrap(),
            r#"{"type":"stdio","command":"npx","timeout":5000}"#
        );
    }

    #[test]
    fn empty_sources() {
        assert!(marketplace_source_is_empty(&json!({})));
        assert!(marketplace_source_is_empty(&json!({"source": {}})));
        assert!(!marketplace_source_is_empty(
            &json!({"source": {"source": "github", "repo": "o/r"}})
        ));
    }
}
