//! The committed CRDs are exactly what the Rust types generate.

#[test]
fn committed_crds_match_the_types() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml"))
        .expect("crds/crds.yaml is committed");
    assert!(
        committed == agent_env_operator::crd::to_yaml(),
        "crds/crds.yaml is stale: run `cargo run -- crd > crds/crds.yaml`"
    );
}

#[test]
fn crds_parse_and_carry_the_cel_rules() {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&agent_env_operator::crd::to_yaml()).unwrap();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|d| d["spec"]["names"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "AgentInstance",
            "PluginBinding",
            "PluginMarketplace",
            "McpServer"
        ]
    );
    let text = agent_env_operator::crd::to_yaml();
    for rule in [
        "has(self.agentType) != has(self.instance)",
        "self.matches('^[^@\\\\s]+@[^@\\\\s]+$')",
        "!self.startsWith('/')",
        "[has(self.stdio), has(self.http), has(self.sse)].filter(x, x).size() == 1",
    ] {
        assert!(text.contains(rule), "missing rule {rule}");
    }
    for d in &docs {
        assert_eq!(d["spec"]["names"]["categories"][0], "agentenv");
        assert!(d["spec"]["versions"][0]["subresources"]["status"].is_object());
    }
}
