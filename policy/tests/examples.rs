//! Every sample policy in examples/policies parses and validates without warnings.

use std::path::Path;

use mayfly_policy::Policy;

#[test]
fn every_example_policy_loads_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let mut count = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/policies exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    for path in entries {
        let src = std::fs::read_to_string(&path).expect("readable");
        let name = path.display().to_string();
        match Policy::from_toml(&src, &name) {
            Ok(loaded) => {
                assert!(loaded.warnings.is_empty(), "{name}: {:?}", loaded.warnings);
                let _ = loaded.policy.compile();
            }
            Err(e) => panic!("{e}"),
        }
        count += 1;
    }
    assert!(count >= 5, "expected the sample policies, found {count}");
}
