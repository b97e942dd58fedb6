//! The builtin layer: `agents.json`, `marketplaces-builtin.json` and
//! `mcp-builtin.json` from the config dir (a ConfigMap in a cluster).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::engine::{secrets, shape};

/// File naming the builtin plugins of each agent type.
pub const AGENTS_FILE: &str = "agents.json";
/// File naming the marketplaces of every instance.
pub const MARKETPLACES_FILE: &str = "marketplaces-builtin.json";
/// File naming the MCP servers of every instance.
pub const MCP_FILE: &str = "mcp-builtin.json";
/// Every file the builtin layer reads.
pub const FILES: [&str; 3] = [AGENTS_FILE, MARKETPLACES_FILE, MCP_FILE];

/// The builtin layer, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Builtin {
    /// Enabled builtin plugins per agent type.
    pub types: BTreeMap<String, Vec<String>>,
    /// Marketplaces for every instance, in Claude Code's shape.
    pub marketplaces: BTreeMap<String, Value>,
    /// MCP servers for every instance, in Claude Code's shape (placeholders unfilled).
    pub mcp_servers: BTreeMap<String, Value>,
}

/// A builtin file could not be used. Names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// `--config` names no directory.
    #[error("config dir {} does not exist or is not a directory", .0.display())]
    MissingDir(PathBuf),
    /// A file exists but cannot be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid JSON of the expected shape.
    #[error("{file}: field {field}: {message}")]
    Invalid {
        /// File name.
        file: String,
        /// JSON path of the offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsFile {
    #[serde(default)]
    types: Vec<AgentType>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentType {
    name: String,
    #[serde(default)]
    plugins: Vec<String>,
}

#[derive(Deserialize)]
struct MarketplacesFile {
    #[serde(rename = "extraKnownMarketplaces", default)]
    marketplaces: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct McpFile {
    #[serde(rename = "mcpServers", default)]
    servers: BTreeMap<String, Value>,
}

fn parse<T: for<'de> Deserialize<'de>>(file: &str, bytes: &[u8]) -> Result<T, BuiltinError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        BuiltinError::Invalid {
            file: file.to_owned(),
            field: if field == "." {
                "(document)".into()
            } else {
                field
            },
            message: e.into_inner().to_string(),
        }
    })
}

fn invalid(file: &str, field: String, message: impl Into<String>) -> BuiltinError {
    BuiltinError::Invalid {
        file: file.to_owned(),
        field,
        message: message.into(),
    }
}

impl Builtin {
    /// The builtin layer of `--config`: read from the directory when one is
    /// given, empty otherwise.
    pub fn load(config: Option<&Path>) -> Result<Builtin, BuiltinError> {
        config.map_or_else(|| Ok(Builtin::default()), Builtin::load_dir)
    }

    /// Reads the builtin files from a directory; each file is optional.
    pub fn load_dir(dir: &Path) -> Result<Builtin, BuiltinError> {
        if !dir.is_dir() {
            return Err(BuiltinError::MissingDir(dir.to_owned()));
        }
        let mut files = Vec::new();
        for name in FILES {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => files.push((name, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(BuiltinError::Read { path, source }),
            }
        }
        Builtin::from_files(files.iter().map(|(n, b)| (*n, b.as_slice())))
    }

    /// Builds the layer from file contents by name (a config dir or a ConfigMap's data).
    pub fn from_files<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Builtin, BuiltinError> {
        let mut out = Builtin::default();
        for (name, bytes) in files {
            match name {
                AGENTS_FILE => out.types = load_agents(bytes)?,
                MARKETPLACES_FILE => out.marketplaces = load_marketplaces(bytes)?,
                MCP_FILE => out.mcp_servers = load_mcp(bytes)?,
                _ => {}
            }
        }
        Ok(out)
    }

    /// The builtin plugins of an agent type.
    pub fn plugins_for(&self, agent_type: &str) -> &[String] {
        self.types.get(agent_type).map_or(&[], Vec::as_slice)
    }
}

/// `<key>.<name>` or `<key>.<name>.<field>`.
fn field_path(key: &str, name: &str, field: &str) -> String {
    if field.is_empty() {
        format!("{key}.{name}")
    } else {
        format!("{key}.{name}.{field}")
    }
}

fn load_agents(bytes: &[u8]) -> Result<BTreeMap<String, Vec<String>>, BuiltinError> {
    let file: AgentsFile = parse(AGENTS_FILE, bytes)?;
    let mut types = BTreeMap::new();
    for (i, t) in file.types.into_iter().enumerate() {
        if t.name.is_empty() {
            return Err(invalid(
                AGENTS_FILE,
                format!("types[{i}].name"),
                "must not be empty",
            ));
        }
        for (j, p) in t.plugins.iter().enumerate() {
            if !shape::is_plugin_id(p) {
                return Err(invalid(
                    AGENTS_FILE,
                    format!("types[{i}].plugins[{j}]"),
                    format!("{p:?} is not a plugin id <plugin>@<marketplace>"),
                ));
            }
        }
        if types.insert(t.name.clone(), t.plugins).is_some() {
            return Err(invalid(
                AGENTS_FILE,
                format!("types[{i}].name"),
                format!("agent type {:?} is listed twice", t.name),
            ));
        }
    }
    Ok(types)
}

fn load_marketplaces(bytes: &[u8]) -> Result<BTreeMap<String, Value>, BuiltinError> {
    let file: MarketplacesFile = parse(MARKETPLACES_FILE, bytes)?;
    for (name, entry) in &file.marketplaces {
        let at = |f: &str| field_path("extraKnownMarketplaces", name, f);
        if !shape::is_marketplace_name(name) {
            return Err(invalid(
                MARKETPLACES_FILE,
                at(""),
                "a marketplace name must not be empty or contain @, / or whitespace",
            ));
        }
        shape::check_marketplace_entry(entry)
            .map_err(|(f, m)| invalid(MARKETPLACES_FILE, at(&f), m))?;
    }
    Ok(file.marketplaces)
}

fn load_mcp(bytes: &[u8]) -> Result<BTreeMap<String, Value>, BuiltinError> {
    let file: McpFile = parse(MCP_FILE, bytes)?;
    for (name, entry) in &file.servers {
        let at = |f: &str| field_path("mcpServers", name, f);
        if name == shape::RESERVED_MCP_NAME {
            return Err(invalid(
                MCP_FILE,
                at(""),
                "the MCP server name 'workspace' is reserved by Claude Code",
            ));
        }
        shape::check_mcp_entry(entry).map_err(|(f, m)| invalid(MCP_FILE, at(&f), m))?;
        secrets::check_entry_placeholders(entry)
            .map_err(|(f, e)| invalid(MCP_FILE, at(&f), e.to_string()))?;
    }
    Ok(file.servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(name: &str, body: &str) -> String {
        Builtin::from_files([(name, body.as_bytes())])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn loads_all_three_files() {
        let b = Builtin::from_files([
            (AGENTS_FILE, br#"{"types":[{"name":"coder","plugins":["fmt@tools"]}]}"#.as_slice()),
            (
                MARKETPLACES_FILE,
                br#"{"extraKnownMarketplaces":{"tools":{"source":{"source":"github","repo":"o/r"}}}}"#,
            ),
            (MCP_FILE, br#"{"mcpServers":{"git":{"type":"stdio","command":"git-mcp"}}}"#),
        ])
        .unwrap();
        assert_eq!(b.plugins_for("coder"), ["fmt@tools"]);
        assert!(b.plugins_for("other").is_empty());
        assert_eq!(b.marketplaces.len(), 1);
        assert_eq!(b.mcp_servers.len(), 1);
    }

    #[test]
    fn errors_name_file_and_field() {
        assert_eq!(
            err(
                AGENTS_FILE,
                r#"{"types":[{"name":"c","plugins":["nope"]}]}"#
            ),
            r#"agents.json: field types[0].plugins[0]: "nope" is not a plugin id <plugin>@<marketplace>"#
        );
        assert!(
            err(AGENTS_FILE, r#"{"types":[{"name":"c","plugin":[]}]}"#)
                .starts_with("agents.json: field types[0].plugin: unknown field")
        );
        let e = err(AGENTS_FILE, "{not json");
        assert!(e.starts_with("agents.json: field "), "{e}");
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(
            err(MCP_FILE, r#"{"mcpServers":{"workspace":{"command":"x"}}}"#),
            "mcp-builtin.json: field mcpServers.workspace: the MCP server name 'workspace' is reserved by Claude Code"
        );
        assert_eq!(
            err(MCP_FILE, r#"{"mcpServers":{"s":{"type":"http"}}}"#),
            "mcp-builtin.json: field mcpServers.s.url: must be a non-empty string"
        );
        assert!(
            err(
                MCP_FILE,
                r#"{"mcpServers":{"s":{"command":"x","args":["${SECRET:a b}"]}}}"#
            )
            .starts_with(
                "mcp-builtin.json: field mcpServers.s.args[0]: malformed secret placeholder"
            )
        );
        assert_eq!(
            err(
                MARKETPLACES_FILE,
                r#"{"extraKnownMarketplaces":{"m":{"source":"github"}}}"#
            ),
            "marketplaces-builtin.json: field extraKnownMarketplaces.m.source: must be an object"
        );
    }

    #[test]
    fn missing_dir_is_an_error() {
        let e = Builtin::load_dir(Path::new("/nonexistent/config")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config dir /nonexistent/config does not exist or is not a directory"
        );
    }
}
