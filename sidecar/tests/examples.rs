//! Every sample sidecar config under examples/configs parses and validates.

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/configs") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            mayfly_sidecar::config::Config::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n > 0, "no example configs found");
}
