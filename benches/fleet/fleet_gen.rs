//! The synthetic fleet: manifests and builtin config for the operator, and
//! the same declarations as plain JSON for the scripted baseline.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value, json};

/// Agent types.
pub const TYPES: usize = 10;
/// Plugins bound per type.
pub const PLUGINS: usize = 20;
/// MCP servers per type, each with a secret.
pub const MCP: usize = 10;
/// Namespace of the whole fleet.
pub const NS: &str = "bench";

pub fn type_name(t: usize) -> String {
    format!("t{t:02}")
}

pub fn instance_name(i: usize) -> String {
    format!("a{i:05}")
}

pub fn type_of(i: usize) -> usize {
    i % TYPES
}

fn secret_name(t: usize, m: usize) -> String {
    format!("TOKEN_T{t:02}_{m:02}")
}

fn secret_value(t: usize, m: usize) -> String {
    format!(
        "tok-{t:02}-{m:02}-{:016x}",
        (t * 131 + m * 7919) as u64 * 0x9E37_79B9
    )
}

/// Writes `manifests/`, `config/` and `baseline/` under `dir` for `n` instances.
pub fn generate(dir: &Path, n: usize) {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(manifests.join("types")).unwrap();
    std::fs::create_dir_all(manifests.join("instances")).unwrap();
    write_config(&dir.join("config"));
    for t in 0..TYPES {
        std::fs::write(
            manifests.join(format!("types/{}.yaml", type_name(t))),
            type_manifest(t, &[]),
        )
        .unwrap();
    }
    for (part, chunk) in (0..n).collect::<Vec<_>>().chunks(1000).enumerate() {
        let mut text = String::new();
        for &i in chunk {
            instance_manifest(&mut text, i);
        }
        std::fs::write(
            manifests.join(format!("instances/part-{part:02}.yaml")),
            text,
        )
        .unwrap();
    }
    write_baseline_inputs(&dir.join("baseline"), n);
}

/// The type's objects; `extra` plugins are added to its binding (the fan-out edit).
pub fn type_manifest(t: usize, extra: &[&str]) -> String {
    let ty = type_name(t);
    let mut s = String::new();
    let _ = write!(
        s,
        "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata:\n  name: {ty}-plugins\n  namespace: {NS}\nspec:\n  target:\n    agentType: {ty}\n  plugins:\n"
    );
    for p in 0..PLUGINS {
        let _ = writeln!(s, "    - name: p{p:02}@mkt-{ty}");
    }
    for e in extra {
        let _ = writeln!(s, "    - name: {e}@mkt-{ty}");
    }
    let _ = write!(
        s,
        "---\napiVersion: agentenv.io/v1alpha1\nkind: PluginMarketplace\nmetadata:\n  name: mkt-{ty}\n  namespace: {NS}\nspec:\n  target:\n    agentType: {ty}\n  source:\n    github:\n      repo: acme/plugins-{ty}\n"
    );
    for m in 0..MCP {
        let secret = secret_name(t, m);
        if m % 2 == 0 {
            let _ = write!(
                s,
                "---\napiVersion: agentenv.io/v1alpha1\nkind: McpServer\nmetadata:\n  name: {ty}-srv{m:02}\n  namespace: {NS}\nspec:\n  target:\n    agentType: {ty}\n  name: srv{m:02}\n  stdio:\n    command: mcp-{m:02}\n    args: [\"--team\", \"{ty}\"]\n    env:\n      TOKEN: \"${{SECRET:{secret}}}\"\n"
            );
        } else {
            let _ = write!(
                s,
                "---\napiVersion: agentenv.io/v1alpha1\nkind: McpServer\nmetadata:\n  name: {ty}-srv{m:02}\n  namespace: {NS}\nspec:\n  target:\n    agentType: {ty}\n  name: srv{m:02}\n  http:\n    url: https://mcp-{m:02}.acme.internal/{ty}\n    headers:\n      Authorization: \"Bearer ${{SECRET:{secret}}}\"\n"
            );
        }
    }
    let _ = write!(
        s,
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {ty}-tokens\n  namespace: {NS}\n  labels:\n    agentenv.io/secrets: \"true\"\nstringData:\n"
    );
    for m in 0..MCP {
        let _ = writeln!(s, "  {}: {}", secret_name(t, m), secret_value(t, m));
    }
    s
}

/// One instance and its three instance-scope overrides: a type plugin
/// turned off, a plugin of its own, and its own version of a type server.
fn instance_manifest(s: &mut String, i: usize) {
    let name = instance_name(i);
    let ty = type_name(type_of(i));
    let secret = secret_name(type_of(i), 0);
    let _ = write!(
        s,
        "---\napiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  agentType: {ty}\n\
         ---\napiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata:\n  name: {name}-own\n  namespace: {NS}\nspec:\n  target:\n    instance: {name}\n  plugins:\n    - name: p00@mkt-{ty}\n      enabled: false\n    - name: own-{name}@mkt-{ty}\n\
         ---\napiVersion: agentenv.io/v1alpha1\nkind: McpServer\nmetadata:\n  name: {name}-srv00\n  namespace: {NS}\nspec:\n  target:\n    instance: {name}\n  name: srv00\n  stdio:\n    command: mcp-00\n    args: [\"--user\", \"{name}\"]\n    env:\n      TOKEN: \"${{SECRET:{secret}}}\"\n"
    );
}

fn write_config(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let types: Vec<Value> = (0..TYPES)
        .map(|t| json!({"name": type_name(t), "plugins": ["core-a@builtin", "core-b@builtin"]}))
        .collect();
    std::fs::write(
        dir.join("agents.json"),
        serde_json::to_vec_pretty(&json!({ "types": types })).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("marketplaces-builtin.json"),
        serde_json::to_vec_pretty(&json!({"extraKnownMarketplaces": builtin_marketplaces()}))
            .unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("mcp-builtin.json"),
        serde_json::to_vec_pretty(&json!({"mcpServers": builtin_mcp()})).unwrap(),
    )
    .unwrap();
}

fn builtin_marketplaces() -> Value {
    json!({"builtin": {"source": {"source": "github", "repo": "acme/builtin-plugins"}}})
}

fn builtin_mcp() -> Value {
    json!({"docs": {"type": "http", "url": "https://docs.acme.internal/mcp"}})
}

/// The declarations as a team without the operator would keep them: one
/// JSON file per type (builtins folded in), one per instance, the secrets.
fn write_baseline_inputs(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("types")).unwrap();
    std::fs::create_dir_all(dir.join("overrides")).unwrap();
    let mut secrets = Map::new();
    for t in 0..TYPES {
        let ty = type_name(t);
        let mut plugins = Map::new();
        for p in ["core-a@builtin", "core-b@builtin"] {
            plugins.insert(p.into(), json!(true));
        }
        for p in 0..PLUGINS {
            plugins.insert(format!("p{p:02}@mkt-{ty}"), json!(true));
        }
        let mut markets = builtin_marketplaces().as_object().unwrap().clone();
        markets.insert(
            format!("mkt-{ty}"),
            json!({"source": {"source": "github", "repo": format!("acme/plugins-{ty}")}}),
        );
        let mut mcp = builtin_mcp().as_object().unwrap().clone();
        for m in 0..MCP {
            let placeholder = format!("${{SECRET:{}}}", secret_name(t, m));
            let entry = if m % 2 == 0 {
                json!({"type": "stdio", "command": format!("mcp-{m:02}"), "args": ["--team", ty], "env": {"TOKEN": placeholder}})
            } else {
                json!({"type": "http", "url": format!("https://mcp-{m:02}.acme.internal/{ty}"), "headers": {"Authorization": format!("Bearer {placeholder}")}})
            };
            mcp.insert(format!("srv{m:02}"), entry);
            secrets.insert(secret_name(t, m), json!(secret_value(t, m)));
        }
        let doc = json!({"enabledPlugins": plugins, "extraKnownMarketplaces": markets, "mcpServers": mcp});
        std::fs::write(
            dir.join(format!("types/{ty}.json")),
            serde_json::to_vec(&doc).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("secrets.json"),
        serde_json::to_vec(&secrets).unwrap(),
    )
    .unwrap();
    let mut list = String::new();
    for i in 0..n {
        let name = instance_name(i);
        let t = type_of(i);
        let ty = type_name(t);
        let _ = writeln!(list, "{name} {ty}");
        let doc = json!({
            "enabledPlugins": {format!("p00@mkt-{ty}"): false, format!("own-{name}@mkt-{ty}"): true},
            "mcpServers": {"srv00": {"type": "stdio", "command": "mcp-00", "args": ["--user", name], "env": {"TOKEN": format!("${{SECRET:{}}}", secret_name(t, 0))}}}
        });
        std::fs::write(
            dir.join(format!("overrides/{name}.json")),
            serde_json::to_vec(&doc).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(dir.join("instances.txt"), list).unwrap();
}
