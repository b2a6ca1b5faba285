//! HTTP path normalisation, shared by rule loading and the HTTP layer, and the form of a
//! path that deny rules match against.

use std::borrow::Cow;

/// Why a request path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is empty or does not start with `/`.
    #[error("the path must start with `/`")]
    NotAbsolute,
    /// `%2F` (an encoded `/`): the application might decode it into a separator.
    #[error("encoded `/` (%2F) is refused")]
    EncodedSlash,
    /// `%5C` (an encoded `\`): some servers treat it as a separator.
    #[error("encoded `\\` (%5C) is refused")]
    EncodedBackslash,
    /// A raw `\`: some servers treat it as a separator.
    #[error("`\\` is refused in paths")]
    Backslash,
    /// A raw NUL or other control character.
    #[error("control characters are refused in paths")]
    ControlChar,
    /// An encoded NUL or other control character (`%00`..`%1F`, `%7F`).
    #[error("encoded control characters are refused in paths")]
    EncodedControl,
    /// A `%` not followed by two hex digits.
    #[error("`%` must be followed by two hex digits")]
    BadEscape,
    /// A segment that is `.` or `..` once its `;parameters` and trailing spaces are removed
    /// (`..;x`, `%2e%2e;`, `..%20`): Tomcat, Jetty and Spring read it as a dot segment.
    #[error("a dot segment with parameters or trailing spaces (`..;x`) is refused")]
    DisguisedDotSegment,
}

/// Bytes that stay raw in a normal path: RFC 3986 `pchar` minus `%`, plus `/`.
fn is_raw_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escaped(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

/// Decodes one `%XX` escape at `bytes[i]`, refusing the dangerous ones.
fn decode_escape(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    let hi = bytes.get(i + 1).copied().and_then(hex_val);
    let lo = bytes.get(i + 2).copied().and_then(hex_val);
    let (Some(hi), Some(lo)) = (hi, lo) else {
        return Err(PathError::BadEscape);
    };
    match hi << 4 | lo {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::EncodedBackslash),
        v if v < 0x20 || v == 0x7f => Err(PathError::EncodedControl),
        v => Ok(v),
    }
}

/// Normalises the path of a request target, the same way for rules and for requests.
///
/// Drops `?query` and `#fragment`; requires a leading `/`; decodes `%XX` of unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`) and upper-cases the hex of other escapes; escapes bytes
/// that may not appear raw (space, `"`, non-ASCII, ...); refuses `%2F`, `%5C`, `\`, and raw or
/// encoded control characters, and segments that are `.` or `..` once their `;parameters` and
/// trailing spaces are removed (`..;x`); merges `//`; resolves `.` and `..` (never above `/`).
/// A trailing `/` is kept. Idempotent: `normalize_path(&normalize_path(x)?) == normalize_path(x)`.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let bytes = &raw.as_bytes()[..end];
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut decoded = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let v = decode_escape(bytes, i)?;
                if is_unreserved(v) {
                    decoded.push(char::from(v));
                } else {
                    push_escaped(&mut decoded, v);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b if b < 0x20 || b == 0x7f => return Err(PathError::ControlChar),
            b if is_raw_ok(b) => decoded.push(char::from(b)),
            b => push_escaped(&mut decoded, b),
        }
        i += 1;
    }
    if decoded.split('/').any(is_disguised_dot_segment) {
        return Err(PathError::DisguisedDotSegment);
    }
    Ok(resolve_segments(&decoded))
}

/// A segment with its `;parameters` removed (Tomcat, Jetty and Spring ignore them).
fn without_params(seg: &str) -> &str {
    seg.split_once(';').map_or(seg, |(name, _)| name)
}

/// `seg` without trailing dots and spaces (raw or `%20`), which Windows and IIS ignore.
fn trim_dots_and_spaces(mut seg: &str) -> &str {
    loop {
        let t = seg
            .strip_suffix('.')
            .or_else(|| seg.strip_suffix(' '))
            .or_else(|| seg.strip_suffix("%20"));
        match t {
            Some(t) => seg = t,
            None => return seg,
        }
    }
}

/// `seg` without trailing spaces (raw or `%20`).
fn trim_spaces(mut seg: &str) -> &str {
    while let Some(t) = seg.strip_suffix(' ').or_else(|| seg.strip_suffix("%20")) {
        seg = t;
    }
    seg
}

/// A segment that is not a plain `.` / `..` but reads as one once its parameters and trailing
/// spaces are gone (`..;x`, `.;`, `..%20`).
fn is_disguised_dot_segment(seg: &str) -> bool {
    matches!(trim_spaces(without_params(seg)), "." | "..") && !matches!(seg, "." | "..")
}

/// The form of a normal path that deny rules match against: the path as permissive backends
/// read it. In every segment `;parameters` are removed (Tomcat, Jetty, Spring), ASCII letters
/// are lower-cased outside `%XX` escapes (Express, IIS), and trailing dots and spaces are
/// removed (IIS, Windows); segments left empty are merged, and a trailing `/` is kept.
/// Borrows when nothing changes (the common case). Idempotent.
///
/// `/ADMIN`, `/Admin`, `/admin.`, `/admin%20` and `/admin;x` all read as `/admin`.
pub fn deny_form(path: &str) -> Cow<'_, str> {
    if !needs_folding(path) {
        return Cow::Borrowed(path);
    }
    let segs: Vec<&str> = path.get(1..).unwrap_or("").split('/').collect();
    let last = segs.len().saturating_sub(1);
    let mut out = String::with_capacity(path.len());
    let mut trailing = false;
    for (i, seg) in segs.iter().enumerate() {
        let seg = trim_dots_and_spaces(without_params(seg));
        if seg.is_empty() {
            trailing = i == last;
            continue;
        }
        out.push('/');
        push_lowercase(&mut out, seg);
        trailing = false;
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// ASCII letters lower-cased, except the hex digits of `%XX` escapes.
fn push_lowercase(out: &mut String, seg: &str) {
    let mut escape = 0;
    for c in seg.chars() {
        if escape > 0 {
            escape -= 1;
            out.push(c);
        } else if c == '%' {
            escape = 2;
            out.push(c);
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
}

/// Whether [`deny_form`] would change `path`.
fn needs_folding(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                i += 3;
                continue;
            }
            b';' => return true,
            b if b.is_ascii_uppercase() => return true,
            _ => {}
        }
        i += 1;
    }
    path.split('/')
        .any(|seg| trim_dots_and_spaces(seg).len() != seg.len())
}

/// Merges empty segments and resolves dot segments of a path that starts with `/`.
fn resolve_segments(path: &str) -> String {
    let segs: Vec<&str> = path.get(1..).unwrap_or("").split('/').collect();
    let last = segs.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    let mut trailing = false;
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "" | "." => trailing = i == last,
            ".." => {
                out.pop();
                trailing = i == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut res = String::with_capacity(path.len());
    for s in &out {
        res.push('/');
        res.push_str(s);
    }
    if trailing || out.is_empty() {
        res.push('/');
    }
    res
}

/// True if `path` is already in normal form (`normalize_path(path) == Ok(path)`), checked
/// without allocating. The engine refuses requests whose path is not normal.
pub fn is_normalized(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            match decode_escape(bytes, i) {
                Ok(v) if !is_unreserved(v) => {}
                _ => return false,
            }
            // Escapes must use upper-case hex.
            if bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) {
                return false;
            }
            i += 3;
            continue;
        }
        if !is_raw_ok(b) {
            return false;
        }
        i += 1;
    }
    // No empty segment except one trailing `/` (or the root), no dot segment.
    let segs = &path[1..];
    if segs.is_empty() {
        return true;
    }
    let mut it = segs.split('/').peekable();
    while let Some(seg) = it.next() {
        let is_last = it.peek().is_none();
        match seg {
            "" if is_last => {}
            "" | "." | ".." => return false,
            s if is_disguised_dot_segment(s) => return false,
            _ => {}
        }
    }
    true
}
