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

/// Every kustomization's resources exist and every manifest parses.
#[test]
fn kustomizations_reference_existing_parseable_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["crds", "deploy"] {
        let k: serde_json::Value = serde_saphyr::from_str(
            &std::fs::read_to_string(root.join(dir).join("kustomization.yaml")).unwrap(),
        )
        .unwrap();
        assert_eq!(k["kind"], "Kustomization");
        for r in k["resources"].as_array().unwrap() {
            let p = root.join(dir).join(r.as_str().unwrap());
            assert!(p.exists(), "{dir}: {} is missing", p.display());
            if p.is_file() {
                let docs: Vec<serde_json::Value> =
                    serde_saphyr::from_multiple(&std::fs::read_to_string(&p).unwrap()).unwrap();
                assert!(
                    docs.iter().all(|d| d["kind"].is_string()),
                    "{}",
                    p.display()
                );
            }
        }
    }
}
