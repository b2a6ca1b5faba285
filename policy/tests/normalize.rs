//! Path normalisation: table, refusals, and properties.

use mayfly_policy::{PathError, is_normalized, normalize_path};
use proptest::prelude::*;

#[test]
fn paths_normalise_as_documented() {
    let cases = [
        ("/", "/"),
        ("/orders", "/orders"),
        ("/orders/", "/orders/"),
        ("/orders?x=1#f", "/orders"),
        ("/orders#frag?x", "/orders"),
        ("//orders///42", "/orders/42"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/../../etc", "/etc"),
        ("/%2e%2E/admin", "/admin"),
        ("/a/%2e/b", "/a/b"),
        ("/%61%62%7E%2D", "/ab~-"),
        ("/a%3fb", "/a%3Fb"),
        ("/a%20b", "/a%20b"),
        ("/a b", "/a%20b"),
        ("/caf\u{e9}", "/caf%C3%A9"),
        ("/a;b=c/@:!$&'()*+,", "/a;b=c/@:!$&'()*+,"),
        ("/%25", "/%25"),
    ];
    for (raw, want) in cases {
        assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw:?}");
    }
}

#[test]
fn dangerous_paths_are_refused() {
    let cases = [
        ("", PathError::NotAbsolute),
        ("orders", PathError::NotAbsolute),
        ("?x", PathError::NotAbsolute),
        ("/a%2Fb", PathError::EncodedSlash),
        ("/a%2fb", PathError::EncodedSlash),
        ("/a%5Cb", PathError::EncodedBackslash),
        ("/a\\b", PathError::Backslash),
        ("/a\0b", PathError::ControlChar),
        ("/a\nb", PathError::ControlChar),
        ("/a%00", PathError::EncodedControl),
        ("/a%0d%0a", PathError::EncodedControl),
        ("/a%7f", PathError::EncodedControl),
        ("/a%", PathError::BadEscape),
        ("/a%4", PathError::BadEscape),
        ("/a%zz", PathError::BadEscape),
    ];
    for (raw, want) in cases {
        assert_eq!(normalize_path(raw), Err(want), "{raw:?}");
    }
}

#[test]
fn is_normalized_agrees_on_examples() {
    for p in ["/", "/a", "/a/", "/a%20b", "/a/b/c"] {
        assert!(is_normalized(p), "{p}");
    }
    for p in [
        "", "a", "//", "/a//b", "/./a", "/a/..", "/a%2f", "/a%3f", "/%41", "/a?x", "/a b",
    ] {
        assert!(!is_normalized(p), "{p}");
    }
}

fn path_like() -> impl Strategy<Value = String> {
    // Heavy on the characters that matter: separators, dots, escapes.
    proptest::string::string_regex("[/./%a-fA-F0-9?#\\\\ x~é]{0,24}").expect("valid regex")
}

proptest! {
    #[test]
    fn normalisation_is_idempotent(raw in path_like()) {
        if let Ok(once) = normalize_path(&raw) {
            prop_assert_eq!(normalize_path(&once), Ok(once.clone()));
            prop_assert!(is_normalized(&once), "{once:?} should be normal");
        }
    }

    #[test]
    fn is_normalized_matches_normalize(raw in path_like()) {
        let fixed_point = normalize_path(&raw).as_deref() == Ok(raw.as_str());
        prop_assert_eq!(is_normalized(&raw), fixed_point, "{:?}", raw);
    }

    #[test]
    fn normalisation_never_panics_on_any_string(raw in ".*") {
        let _ = normalize_path(&raw);
        let _ = is_normalized(&raw);
    }

    #[test]
    fn normal_paths_have_no_dot_segments(raw in path_like()) {
        if let Ok(p) = normalize_path(&raw) {
            prop_assert!(p.starts_with('/'));
            prop_assert!(!p.contains("//"));
            prop_assert!(!p.split('/').any(|s| s == "." || s == ".."));
            prop_assert!(!p.contains('\\'));
            prop_assert!(!p.to_ascii_uppercase().contains("%2F"));
        }
    }
}
