//! The three keys the operator owns, and a container holding one value per key.

use std::fmt;
use std::ops::{Index, IndexMut};

use serde::{Deserialize, Serialize};

/// The file an owned key lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EnvFile {
    /// `settings.json`
    Settings,
    /// `.claude.json`
    ClaudeJson,
}

impl EnvFile {
    /// Both files, in the order they are written.
    pub const ALL: [EnvFile; 2] = [EnvFile::Settings, EnvFile::ClaudeJson];

    /// File name inside the env dir.
    pub fn file_name(self) -> &'static str {
        match self {
            EnvFile::Settings => "settings.json",
            EnvFile::ClaudeJson => ".claude.json",
        }
    }

    /// `.claude.json` may hold tokens, so only its owner may read it.
    pub fn mode(self) -> u32 {
        match self {
            EnvFile::Settings => 0o644,
            EnvFile::ClaudeJson => 0o600,
        }
    }

    /// The owned keys this file holds.
    pub fn sections(self) -> &'static [Section] {
        match self {
            EnvFile::Settings => &[Section::Plugins, Section::Marketplaces],
            EnvFile::ClaudeJson => &[Section::McpServers],
        }
    }
}

impl fmt::Display for EnvFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_name())
    }
}

/// One owned key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    /// `enabledPlugins` in `settings.json`
    Plugins,
    /// `extraKnownMarketplaces` in `settings.json`
    Marketplaces,
    /// `mcpServers` in `.claude.json`
    McpServers,
}

impl Section {
    /// Every owned key.
    pub const ALL: [Section; 3] = [Section::Plugins, Section::Marketplaces, Section::McpServers];

    /// The JSON key in its file.
    pub fn key(self) -> &'static str {
        match self {
            Section::Plugins => "enabledPlugins",
            Section::Marketplaces => "extraKnownMarketplaces",
            Section::McpServers => "mcpServers",
        }
    }

    /// The file holding the key.
    pub fn file(self) -> EnvFile {
        match self {
            Section::Plugins | Section::Marketplaces => EnvFile::Settings,
            Section::McpServers => EnvFile::ClaudeJson,
        }
    }

    /// Parses [`Section::key`] back.
    pub fn from_key(key: &str) -> Option<Section> {
        Section::ALL.into_iter().find(|s| s.key() == key)
    }
}

impl Serialize for Section {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// One `T` per owned key, so the three keys are handled by one piece of code.
/// Serializes with the owned keys' own names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerSection<T> {
    /// `enabledPlugins`
    #[serde(rename = "enabledPlugins", default)]
    pub plugins: T,
    /// `extraKnownMarketplaces`
    #[serde(rename = "extraKnownMarketplaces", default)]
    pub marketplaces: T,
    /// `mcpServers`
    #[serde(rename = "mcpServers", default)]
    pub mcp_servers: T,
}

impl<T> PerSection<T> {
    /// Builds each value from its section.
    pub fn from_fn(mut f: impl FnMut(Section) -> T) -> Self {
        PerSection {
            plugins: f(Section::Plugins),
            marketplaces: f(Section::Marketplaces),
            mcp_servers: f(Section::McpServers),
        }
    }

    /// The sections with their values.
    pub fn iter(&self) -> impl Iterator<Item = (Section, &T)> {
        Section::ALL.into_iter().map(move |s| (s, &self[s]))
    }

    /// Maps every value.
    pub fn map<U>(&self, mut f: impl FnMut(Section, &T) -> U) -> PerSection<U> {
        PerSection::from_fn(|s| f(s, &self[s]))
    }
}

impl<T> Index<Section> for PerSection<T> {
    type Output = T;
    fn index(&self, s: Section) -> &T {
        match s {
            Section::Plugins => &self.plugins,
            Section::Marketplaces => &self.marketplaces,
            Section::McpServers => &self.mcp_servers,
        }
    }
}

impl<T> IndexMut<Section> for PerSection<T> {
    fn index_mut(&mut self, s: Section) -> &mut T {
        match s {
            Section::Plugins => &mut self.plugins,
            Section::Marketplaces => &mut self.marketplaces,
            Section::McpServers => &mut self.mcp_servers,
        }
    }
}
