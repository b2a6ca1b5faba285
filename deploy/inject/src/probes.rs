//! The probe contract between the injector and the sidecar's admin listener: the injector
//! rewrites each app `httpGet` probe to `GET <admin port>/app-health/<container>/<probe>` and
//! hands the sidecar the mapping in [`APP_PROBES_ENV`]; the admin listener (in
//! `mayfly-sidecar`) parses it with [`parse_app_probes`] and forwards each route to the app's
//! loopback port. Both sides use these definitions, so they cannot drift apart.

use std::collections::HashMap;

/// The environment variable holding the app probes the admin listener forwards, as JSON:
/// `{"/app-health/<container>/<probe>": {"port": 8080, "path": "/healthz", "headers": []}}`.
pub const APP_PROBES_ENV: &str = "MAYFLY_APP_PROBES";
/// The path prefix of the forwarded app probes.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// One app probe: always to `127.0.0.1:port`, never elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    /// The app's port on loopback.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Extra request headers (the probe's `httpHeaders`).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// Why the [`APP_PROBES_ENV`] value is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbesError {
    /// Not the JSON map described at [`APP_PROBES_ENV`].
    #[error("{env}: {0}", env = APP_PROBES_ENV)]
    Json(#[from] serde_json::Error),
    /// A route outside [`APP_HEALTH_PREFIX`], port 0, or a path not starting with `/`.
    #[error("{env}: {0:?}: a route under {prefix}, a port and a path starting with / are needed", env = APP_PROBES_ENV, prefix = APP_HEALTH_PREFIX)]
    Route(String),
}

/// Parses the [`APP_PROBES_ENV`] JSON; `None` is no probes.
pub fn parse_app_probes(json: Option<&str>) -> Result<HashMap<String, AppProbe>, ProbesError> {
    let Some(json) = json.filter(|s| !s.trim().is_empty()) else {
        return Ok(HashMap::new());
    };
    let map: HashMap<String, AppProbe> = serde_json::from_str(json)?;
    for (route, p) in &map {
        if !route.starts_with(APP_HEALTH_PREFIX) || p.port == 0 || !p.path.starts_with('/') {
            return Err(ProbesError::Route(route.clone()));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEEDED: &str = "a route under /app-health/, a port and a path starting with / are needed";

    #[test]
    fn the_probe_mapping_parses_and_bad_routes_ports_paths_and_fields_are_refused() {
        assert!(parse_app_probes(None).unwrap().is_empty());
        assert!(parse_app_probes(Some("  ")).unwrap().is_empty());
        let ok = parse_app_probes(Some(
            r#"{"/app-health/app/livez": {"port": 8080, "path": "/healthz"}}"#,
        ))
        .unwrap();
        assert_eq!(
            ok["/app-health/app/livez"],
            AppProbe {
                port: 8080,
                path: "/healthz".into(),
                headers: Vec::new(),
            }
        );
        for bad in [
            r#"{"/elsewhere": {"port": 8080, "path": "/"}}"#,
            r#"{"/app-health/a/livez": {"port": 0, "path": "/"}}"#,
            r#"{"/app-health/a/livez": {"port": 1, "path": "x"}}"#,
        ] {
            let e = parse_app_probes(Some(bad)).unwrap_err();
            assert!(matches!(e, ProbesError::Route(_)), "{bad}: {e}");
            let e = e.to_string();
            assert!(
                e.starts_with("MAYFLY_APP_PROBES: \"/") && e.ends_with(NEEDED),
                "{bad}: {e}"
            );
        }
        for bad in [
            "{",
            r#"{"/app-health/a/livez": {"port": 1, "path": "/", "host": "elsewhere"}}"#,
        ] {
            let e = parse_app_probes(Some(bad)).unwrap_err();
            assert!(matches!(e, ProbesError::Json(_)), "{bad}: {e}");
            assert!(e.to_string().starts_with("MAYFLY_APP_PROBES: "), "{e}");
        }
    }
}
