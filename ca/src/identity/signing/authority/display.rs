//! Roles, states and changes as logs, metrics and `ca.rotation` events name them.

use super::{Change, Role, State};

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Prepared => "prepared",
            State::Active => "active",
            State::Old => "old",
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Intermediate => "intermediate",
            Role::Jwt => "jwt",
        })
    }
}

impl std::fmt::Display for Change {
    /// `prepared intermediate <id>`, as logs and `ca.rotation` events say it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Prepared(r, id) => write!(f, "prepared {r} {id}"),
            Change::Activated(r, id) => write!(f, "activated {r} {id}"),
            Change::Retired(r, id) => write!(f, "retired {r} {id}"),
            Change::Removed(r, id) => write!(f, "removed {r} {id}"),
            Change::EmergencyRoot(id) => write!(f, "emergency root {id}"),
        }
    }
}
