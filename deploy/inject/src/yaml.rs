//! Multi-document YAML in and out. Documents that do not change are copied byte for byte
//! (comments and layout included); changed ones are written again from the JSON tree.
//!
//! Documents are split at `---` lines. YAML forbids a line starting with `---` followed by a
//! space or the line's end inside a document's content, so the split is exact. Scalars are
//! read as the Kubernetes API machinery reads them (YAML 1.1: `0644` is octal, `yes` a
//! boolean); strings that could read otherwise are quoted on output.

use serde_json::Value;

use crate::{InjectError, InjectOptions, Outcome, inject_object};

fn is_marker(line: &str) -> bool {
    let l = line.trim_end_matches(['\n', '\r']);
    l == "---" || l.starts_with("--- ") || l.starts_with("---\t")
}

/// A line that carries no document content.
fn is_trivia(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || t.starts_with('%')
}

/// The chunks of `text`, each starting at a `---` line (except perhaps the first).
fn split(text: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if is_marker(line) && pos > start {
            chunks.push(&text[start..pos]);
            start = pos;
        }
        pos += line.len();
    }
    if start < text.len() {
        chunks.push(&text[start..]);
    }
    chunks
}

fn options() -> serde_saphyr::options::Options {
    let mut o = serde_saphyr::options::Options::default();
    o.legacy_octal_numbers = true;
    // Deep enough for CRD schemas, shallow enough for the stack (serde_json's own limit).
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_depth = 128;
    o.budget = Some(budget);
    o
}

/// Injects every workload in a multi-document YAML stream; returns the new stream.
pub fn inject_yaml(text: &str, opts: &InjectOptions) -> Result<String, InjectError> {
    opts.check()?;
    let mut out = String::with_capacity(text.len() + 4096);
    let mut doc = 0;
    for chunk in split(text) {
        // The chunk's head: the marker line (if bare) and leading comments, kept as they are.
        let mut head_len = 0;
        let mut body_has_content = false;
        for line in chunk.split_inclusive('\n') {
            let bare_marker = is_marker(line) && is_trivia(line.get(3..).unwrap_or_default());
            if (head_len == 0 && bare_marker) || is_trivia(line) {
                head_len += line.len();
            } else {
                body_has_content = true;
                break;
            }
        }
        if !body_has_content {
            out.push_str(chunk);
            continue;
        }
        doc += 1;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple_with_options(chunk, options()).map_err(|e| {
                InjectError::Yaml {
                    doc,
                    message: e.to_string(),
                }
            })?;
        let mut changed = false;
        let mut injected = Vec::with_capacity(docs.len());
        for mut v in docs {
            if inject_object(&mut v, opts, None)? == Outcome::Injected {
                changed = true;
            }
            injected.push(v);
        }
        if !changed {
            out.push_str(chunk);
            continue;
        }
        let head = &chunk[..head_len];
        if head.is_empty() && is_marker(chunk) {
            // `--- {inline: content}`: the marker goes, the content is rewritten below it.
            out.push_str("---\n");
        } else {
            out.push_str(head);
        }
        for (i, v) in injected.iter().enumerate() {
            if i > 0 {
                out.push_str("---\n");
            }
            let y = serde_saphyr::to_string(v).map_err(|e| InjectError::Emit(e.to_string()))?;
            out.push_str(&y);
            if !y.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// Parses a multi-document YAML stream into JSON values (empty documents are skipped), as
/// [`inject_yaml`] reads it.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, InjectError> {
    serde_saphyr::from_multiple_with_options(text, options()).map_err(|e| InjectError::Yaml {
        doc: 0,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_byte_and_cuts_only_at_markers() {
        let text = "# lead\na: 1\n---\nb: |\n  ---x\n  --- not a marker\n--- # c\nc: 3\n---{x}\n";
        let parts = split(text);
        assert_eq!(parts.concat(), text);
        assert_eq!(parts.len(), 3, "{parts:?}");
        assert!(parts[1].starts_with("---\nb:"));
        assert!(parts[2].starts_with("--- # c"));
    }
}
