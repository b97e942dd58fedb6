//! `PluginMarketplace`: a plugin marketplace known to the agents.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    MAX_HEADERS, MAX_NAME_LENGTH, MAX_PATH_LENGTH, MAX_SHORT_LENGTH, MAX_URL_LENGTH,
    MAX_VALUE_LENGTH, MapBounds, ObjectStatus, Target,
};

/// Makes a plugin marketplace known (`extraKnownMarketplaces`) to every
/// instance of an agent type or to one instance.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentenv.io",
    version = "v1alpha1",
    kind = "PluginMarketplace",
    namespaced,
    status = "ObjectStatus",
    shortname = "pmk",
    category = "agentenv",
    derive = "PartialEq",
    doc = "A Claude Code plugin marketplace made known to an agent type or one instance.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.target.agentType"),
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".spec.target.instance"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PluginMarketplaceSpec {
    /// The instances this marketplace applies to.
    pub target: Target,
    /// Marketplace name as plugins refer to it (`<plugin>@<name>`). Defaults to
    /// `metadata.name`. Must equal the `name` in the marketplace's own
    /// `marketplace.json`: Claude Code registers it under that name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAME_LENGTH))]
    #[x_kube(validation = Rule::new(r"self.matches('^[^@\\s/]+$')").message("must not be empty or contain @, / or whitespace"))]
    pub name: Option<String>,
    /// Where Claude Code fetches the marketplace from.
    pub source: MarketplaceSource,
    /// `false` removes the marketplace from the instances this object applies to.
    #[serde(default = "super::default_true")]
    pub enabled: bool,
}

/// Where a marketplace comes from; set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.github), has(self.git), has(self.url), has(self.directory), has(self.file)].filter(x, x).size() == 1").message("set exactly one of github, git, url, directory or file"))]
pub struct MarketplaceSource {
    /// A GitHub repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<GithubSource>,
    /// Any git repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// A `marketplace.json` served over HTTP(S).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
    /// A directory on the agent's filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathSource>,
    /// A `marketplace.json` file on the agent's filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathSource>,
}

/// A GitHub repository marketplace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GithubSource {
    /// `<owner>/<repo>`.
    #[schemars(length(max = MAX_SHORT_LENGTH))]
    #[x_kube(validation = Rule::new("self.matches('^[^/\\\\s]+/[^/\\\\s]+$')").message("must be <owner>/<repo>"))]
    pub repo: String,
    /// Branch, tag or commit.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_LENGTH))]
    pub git_ref: Option<String>,
    /// Path of the marketplace inside the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PATH_LENGTH))]
    pub path: Option<String>,
}

/// A git repository marketplace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// Clone URL.
    #[schemars(length(min = 1, max = MAX_URL_LENGTH))]
    pub url: String,
    /// Branch, tag or commit.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_LENGTH))]
    pub git_ref: Option<String>,
    /// Path of the marketplace inside the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PATH_LENGTH))]
    pub path: Option<String>,
}

/// A marketplace file served over HTTP(S).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlSource {
    /// URL of the `marketplace.json`.
    #[schemars(length(min = 1, max = MAX_URL_LENGTH))]
    pub url: String,
    /// HTTP headers sent with the request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = MapBounds { entries: MAX_HEADERS, value_length: MAX_VALUE_LENGTH })]
    pub headers: BTreeMap<String, String>,
}

/// A marketplace on the agent's filesystem.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathSource {
    /// Absolute path as the agent sees it (Claude Code would resolve a
    /// relative one against whatever directory the agent runs in).
    #[schemars(length(max = MAX_PATH_LENGTH))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must be an absolute path as the agent sees it"))]
    pub path: String,
}
