fn main() {
    print!("{}", agent_env_operator::crd::to_yaml());
}
