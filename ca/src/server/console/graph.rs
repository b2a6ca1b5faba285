//! The mesh graph: SPIFFE IDs as nodes, caller -> callee edges with their allowed and denied
//! counts over a window, drawn as server-rendered SVG (nodes on a circle).

use std::collections::{BTreeMap, BTreeSet};

use maud::{Markup, html};

use super::records::Decision;

/// The most decision records of one kind the graph reads for a window.
pub const GRAPH_LIMIT: u32 = 100_000;

/// The windows the graph offers (`?window=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Last 15 minutes.
    Minutes15,
    /// Last hour.
    Hour1,
    /// Last 24 hours.
    Hours24,
}

impl Window {
    /// Every window, as offered.
    pub const ALL: [Window; 3] = [Window::Minutes15, Window::Hour1, Window::Hours24];

    /// `15m`, `1h` or `24h`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Window> {
        Self::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// Its name in the query string.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minutes15 => "15m",
            Window::Hour1 => "1h",
            Window::Hours24 => "24h",
        }
    }

    /// Its length in milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            Window::Minutes15 => 15 * 60_000,
            Window::Hour1 => 3_600_000,
            Window::Hours24 => 24 * 3_600_000,
        }
    }
}

/// One caller -> callee edge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edge {
    /// Calling SPIFFE ID.
    pub caller: String,
    /// Called SPIFFE ID.
    pub callee: String,
    /// Calls allowed.
    pub allowed: u64,
    /// Calls denied (by either side's sidecar).
    pub denied: u64,
}

/// The graph of a window.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    /// Every SPIFFE ID on an edge, sorted.
    pub nodes: Vec<String>,
    /// Edges, sorted by caller then callee.
    pub edges: Vec<Edge>,
}

#[derive(Default)]
struct Tally {
    in_allow: u64,
    in_deny: u64,
    out_allow: u64,
    out_deny: u64,
}

/// Builds the graph from decisions. Both sidecars of a call record it: an edge counts the
/// callee's inbound decisions, plus the denials of the caller's outbound ones (a call refused
/// on the way out never reaches the callee); outbound allows count only on an edge with no
/// inbound record at all (a callee outside the mesh).
pub fn build(decisions: impl IntoIterator<Item = Decision>) -> Mesh {
    let mut tallies: BTreeMap<(String, String), Tally> = BTreeMap::new();
    for d in decisions {
        let t = tallies
            .entry((d.caller.clone(), d.callee.clone()))
            .or_default();
        match (d.direction == "inbound", d.denied()) {
            (true, false) => t.in_allow += 1,
            (true, true) => t.in_deny += 1,
            (false, false) => t.out_allow += 1,
            (false, true) => t.out_deny += 1,
        }
    }
    let mut nodes = BTreeSet::new();
    let mut edges = Vec::new();
    for ((caller, callee), t) in tallies {
        let inbound = t.in_allow + t.in_deny > 0;
        nodes.insert(caller.clone());
        nodes.insert(callee.clone());
        edges.push(Edge {
            caller,
            callee,
            allowed: if inbound { t.in_allow } else { t.out_allow },
            denied: t.in_deny + t.out_deny,
        });
    }
    Mesh {
        nodes: nodes.into_iter().collect(),
        edges,
    }
}

/// The path of a SPIFFE ID (`/ns/prod/web`), or the whole text when it has none.
pub fn id_path(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or(id)
}

/// Calls per minute over the window, as text.
pub fn rate(count: u64, window: Window) -> String {
    let per_min = count as f64 * 60_000.0 / window.millis() as f64;
    format!("{per_min:.2}/min")
}

const W: f64 = 900.0;
const H: f64 = 640.0;
const NODE_R: f64 = 34.0;

/// The graph as SVG: nodes on a circle labelled with their SPIFFE ID paths, each edge an arrow
/// labelled with its counts; an edge with denials is drawn red and dashed.
pub fn svg(mesh: &Mesh, window: Window) -> Markup {
    let n = mesh.nodes.len().max(1) as f64;
    let radius = if mesh.nodes.len() <= 1 { 0.0 } else { 240.0 };
    let pos: BTreeMap<&str, (f64, f64)> = mesh
        .nodes
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            (
                id.as_str(),
                (W / 2.0 + radius * a.cos(), H / 2.0 + radius * a.sin()),
            )
        })
        .collect();
    let pairs: BTreeSet<(&str, &str)> = mesh
        .edges
        .iter()
        .map(|e| (e.caller.as_str(), e.callee.as_str()))
        .collect();
    html! {
        svg id="mesh" class="mesh" viewBox=(format!("0 0 {W} {H}")) role="img"
            aria-label="mesh graph" xmlns="http://www.w3.org/2000/svg" {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8"
                    markerHeight="8" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="#2e7d32" {}
                }
                marker id="arrow-denied" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8"
                    markerHeight="8" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="#c62828" {}
                }
            }
            @for e in &mesh.edges {
                @if let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(e.caller.as_str()), pos.get(e.callee.as_str())) {
                    @let back = pairs.contains(&(e.callee.as_str(), e.caller.as_str()));
                    @let (ax, ay, bx, by) = ends(x1, y1, x2, y2, back);
                    @let denied = e.denied > 0;
                    g class=(if denied { "edge denied" } else { "edge allowed" })
                        data-caller=(e.caller) data-callee=(e.callee)
                        data-allowed=(e.allowed) data-denied=(e.denied) {
                        title { (e.caller) " -> " (e.callee) ": " (e.allowed) " allowed, "
                            (e.denied) " denied in " (window.as_str()) }
                        line x1=(fmt(ax)) y1=(fmt(ay)) x2=(fmt(bx)) y2=(fmt(by))
                            stroke=(if denied { "#c62828" } else { "#2e7d32" }) stroke-width="2"
                            stroke-dasharray=(if denied { "6 4" } else { "none" })
                            marker-end=(if denied { "url(#arrow-denied)" } else { "url(#arrow)" }) {}
                        text class="edge-label" x=(fmt((ax + bx) / 2.0)) y=(fmt((ay + by) / 2.0 - 6.0))
                            text-anchor="middle" {
                            "✓" (e.allowed) " (" (rate(e.allowed, window)) ")"
                            @if denied { "  ✗" (e.denied) " (" (rate(e.denied, window)) ")" }
                        }
                    }
                }
            }
            @for id in &mesh.nodes {
                @if let Some(&(x, y)) = pos.get(id.as_str()) {
                    g class="node" data-id=(id) {
                        title { (id) }
                        circle cx=(fmt(x)) cy=(fmt(y)) r=(NODE_R) fill="#e3f2fd" stroke="#1565c0"
                            stroke-width="2" {}
                        text class="node-label" x=(fmt(x)) y=(fmt(y + 4.0)) text-anchor="middle" {
                            (id_path(id))
                        }
                    }
                }
            }
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

/// An edge's end points: from the caller's circle to the callee's, moved aside when the
/// opposite edge exists so that the two do not overlap.
fn ends(x1: f64, y1: f64, x2: f64, y2: f64, back: bool) -> (f64, f64, f64, f64) {
    let (dx, dy) = (x2 - x1, y2 - y1);
    let len = (dx * dx + dy * dy).sqrt().max(1.0);
    let (ux, uy) = (dx / len, dy / len);
    let shift = if back { 7.0 } else { 0.0 };
    let (px, py) = (-uy * shift, ux * shift);
    (
        x1 + ux * NODE_R + px,
        y1 + uy * NODE_R + py,
        x2 - ux * (NODE_R + 2.0) + px,
        y2 - uy * (NODE_R + 2.0) + py,
    )
}
