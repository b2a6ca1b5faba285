//! `[inbound]` / `[[inbound]]`: the listeners peers dial, and what each advertises.

use std::net::SocketAddr;

use super::raw::RawInbound;
use super::{ConfigError, Ctx, Inbound};

impl Ctx<'_> {
    /// The inbound listeners: one `[inbound]` table (keys named `inbound.listen`), or an
    /// `[[inbound]]` array of them (keys named `inbound[1].listen`), each on its own address.
    pub(super) fn inbound(&self, raw: Option<toml::Value>) -> Result<Vec<Inbound>, ConfigError> {
        let (tables, single) = match raw {
            None => (Vec::new(), false),
            Some(t @ toml::Value::Table(_)) => (vec![t], true),
            Some(toml::Value::Array(a)) => (a, false),
            Some(_) => {
                return Err(self.bad(
                    "inbound",
                    "must be an [inbound] table or [[inbound]] tables",
                ));
            }
        };
        let mut out: Vec<Inbound> = Vec::with_capacity(tables.len());
        for (n, t) in tables.into_iter().enumerate() {
            let name = if single {
                "inbound".to_owned()
            } else {
                format!("inbound[{n}]")
            };
            let key = |k: &str| format!("{name}.{k}");
            let i: RawInbound = t
                .try_into()
                .map_err(|e: toml::de::Error| self.bad(&name, e.message().trim_end()))?;
            let listen = self.addr(&key("listen"), &i.listen)?;
            if listen.port() != 0 && out.iter().any(|o| o.listen == listen) {
                return Err(self.bad(
                    key("listen"),
                    format!("{listen} is used by another [[inbound]] listener"),
                ));
            }
            match &i.advertise {
                Some(a) => {
                    // Checked as it will be once its variables are set (to a documentation
                    // address): `check` may run where they are not, as injection's does.
                    let shown = expand(a, |_| Some("192.0.2.1".to_owned()))
                        .map_err(|e| self.bad(key("advertise"), e))?;
                    mayfly_ca::api::check_endpoint(&shown)
                        .map_err(|e| self.bad(key("advertise"), e))?;
                }
                None if listen.ip().is_unspecified() => {
                    return Err(self.bad(
                        key("advertise"),
                        format!(
                            "required: {} listens on the wildcard address {listen}, which peers \
                             cannot dial; set the address they dial, e.g. advertise = \
                             \"10.0.0.2:{}\" (this host's address), or \"${{POD_IP}}:{}\" from \
                             an environment variable",
                            key("listen"),
                            listen.port(),
                            listen.port()
                        ),
                    ));
                }
                None => {}
            }
            out.push(Inbound {
                listen,
                app: self.addr(&key("app"), &i.app)?,
                protocol: i.protocol,
                app_protocol: i.app_protocol,
                advertise: i.advertise,
            });
        }
        Ok(out)
    }
}

impl Inbound {
    /// The address to register for this listener, bound at `bound` (the listen address with
    /// its port resolved): `advertise` with its `${NAME}` variables read by `var`, else
    /// `bound` unless it is a wildcard.
    pub fn advertised(
        &self,
        bound: SocketAddr,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, String> {
        match &self.advertise {
            Some(a) => {
                let e = expand(a, var).map_err(|e| format!("inbound.advertise = {a:?}: {e}"))?;
                mayfly_ca::api::check_endpoint(&e)
                    .map_err(|err| format!("inbound.advertise = {a:?} gave {e:?}: {err}"))?;
                Ok(Some(e))
            }
            None if bound.ip().is_unspecified() => Ok(None),
            None => Ok(Some(bound.to_string())),
        }
    }
}

/// `text` with every `${NAME}` replaced by `var(NAME)`: an unset or empty variable, a bad
/// name or an unclosed `${` is an error.
pub(super) fn expand(text: &str, var: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "`${` without its closing `}`".to_owned())?;
        let name = &after[..end];
        let ok = name
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
        if name.is_empty() || !ok {
            return Err(format!(
                "`${{{name}}}`: a variable name is letters, digits and `_`, not starting with a digit"
            ));
        }
        match var(name) {
            Some(v) if !v.is_empty() => out.push_str(&v),
            _ => return Err(format!("the environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
