#![no_main]

use agent_env_operator_fuzz::checks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::manifest(data));
