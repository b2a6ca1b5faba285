//! Interoperability with gRPC C-core clients (grpcio, hence py-spiffe; grpc-java too): they
//! send the unix socket's path, percent-encoded, as the HTTP/2 `:authority`
//! (`tmp%2Fagent.sock`), which the `http` crate (and so h2 and tonic) rejects as malformed:
//! the stream is reset with PROTOCOL_ERROR before any handler runs. The authority means nothing
//! on a unix socket, so the client's byte stream is rewritten before h2 reads it: in every
//! header block, the `%` bytes of a plain (not Huffman-coded) `:authority` literal become `_`.
//! Lengths never change, so HPACK's dynamic table stays in step on both sides.
//!
//! [`Rewriter`] works on the HTTP/2 frame stream; [`scan`] on one header block.

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The HPACK static table's index of `:authority`.
const AUTHORITY_INDEX: usize = 1;

/// An HPACK integer with an `n`-bit prefix at `*pos`, advancing `pos`.
fn integer(block: &[u8], pos: &mut usize, n: u32) -> Option<usize> {
    let max = (1usize << n) - 1;
    let mut v = usize::from(*block.get(*pos)?) & max;
    *pos += 1;
    if v < max {
        return Some(v);
    }
    let mut shift = 0u32;
    loop {
        let b = *block.get(*pos)?;
        *pos += 1;
        v = v.checked_add(usize::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// A string literal at `*pos`: (Huffman-coded, start, end), advancing `pos`.
fn string(block: &[u8], pos: &mut usize) -> Option<(bool, usize, usize)> {
    let huffman = block.get(*pos)? & 0x80 != 0;
    let len = integer(block, pos, 7)?;
    let start = *pos;
    let end = start.checked_add(len)?;
    if end > block.len() {
        return None;
    }
    *pos = end;
    Some((huffman, start, end))
}

/// The offsets of the `%` bytes to rewrite in one HPACK header block (the concatenated
/// fragments). Stops quietly at anything it cannot parse: h2 judges the block as it is.
pub fn scan(block: &[u8], out: &mut Vec<usize>) {
    let mut pos = 0;
    while pos < block.len() {
        let b = block[pos];
        let name_index = if b & 0x80 != 0 {
            // Indexed field: nothing literal.
            if integer(block, &mut pos, 7).is_none() {
                return;
            }
            continue;
        } else if b & 0xc0 == 0x40 {
            integer(block, &mut pos, 6)
        } else if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            if integer(block, &mut pos, 5).is_none() {
                return;
            }
            continue;
        } else {
            // Literal without indexing (0000) or never indexed (0001).
            integer(block, &mut pos, 4)
        };
        let Some(name_index) = name_index else { return };
        let is_authority = if name_index == 0 {
            let Some((huffman, s, e)) = string(block, &mut pos) else {
                return;
            };
            !huffman && &block[s..e] == b":authority"
        } else {
            name_index == AUTHORITY_INDEX
        };
        let Some((huffman, s, e)) = string(block, &mut pos) else {
            return;
        };
        if is_authority && !huffman {
            out.extend((s..e).filter(|i| block[*i] == b'%'));
        }
    }
}

/// A header block pending across HEADERS and CONTINUATION frames larger than this is passed on
/// unchanged (h2 limits header lists far below it).
const MAX_PENDING: usize = 1 << 20;

/// Rewrites the client's side of one HTTP/2 connection (see the module doc).
#[derive(Default)]
pub struct Rewriter {
    /// Bytes received and not yet passed on.
    buf: Vec<u8>,
    /// Whether the connection preface has been passed on.
    preface_done: bool,
    /// The frames of a header block without its END_HEADERS yet.
    pending: Vec<u8>,
    /// Where the block's fragments are in `pending`.
    fragments: Vec<(usize, usize)>,
}

impl Rewriter {
    /// Takes bytes from the client; appends to `out` what may be passed on to h2.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.buf.extend_from_slice(data);
        if !self.preface_done {
            if self.buf.len() < PREFACE.len() {
                return;
            }
            out.extend(self.buf.drain(..PREFACE.len()));
            self.preface_done = true;
        }
        while self.buf.len() >= 9 {
            let len = usize::from(self.buf[0]) << 16
                | usize::from(self.buf[1]) << 8
                | usize::from(self.buf[2]);
            if self.buf.len() < 9 + len {
                return;
            }
            let (kind, flags) = (self.buf[3], self.buf[4]);
            let frame: Vec<u8> = self.buf.drain(..9 + len).collect();
            let in_block = kind == HEADERS || (kind == CONTINUATION && !self.pending.is_empty());
            if !in_block {
                self.flush(out, false);
                out.extend_from_slice(&frame);
                continue;
            }
            let (mut start, mut end) = (9, frame.len());
            if kind == HEADERS {
                if flags & PADDED != 0 {
                    let pad = usize::from(frame.get(9).copied().unwrap_or(0));
                    start += 1;
                    end = end.saturating_sub(pad);
                }
                if flags & PRIORITY != 0 {
                    start += 5;
                }
            }
            let base = self.pending.len();
            self.pending.extend_from_slice(&frame);
            if start <= end {
                self.fragments.push((base + start, base + end));
            }
            if flags & END_HEADERS != 0 {
                self.flush(out, true);
            } else if self.pending.len() > MAX_PENDING {
                self.flush(out, false);
            }
        }
    }

    /// Passes the pending header block on, rewritten when `fix`.
    fn flush(&mut self, out: &mut Vec<u8>, fix: bool) {
        if fix {
            let mut block = Vec::new();
            let mut map = Vec::new();
            for (s, e) in &self.fragments {
                block.extend_from_slice(&self.pending[*s..*e]);
                map.extend(*s..*e);
            }
            let mut at = Vec::new();
            scan(&block, &mut at);
            for o in at {
                if let Some(i) = map.get(o) {
                    self.pending[*i] = b'_';
                }
            }
        }
        out.append(&mut self.pending);
        self.fragments.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What grpcio 1.85 (py-spiffe's transport) sent on `unix:/tmp/dump.sock`: the preface,
    /// SETTINGS, WINDOW_UPDATE, then HEADERS with `:authority: tmp%2Fdump.sock` (a literal with
    /// incremental indexing and a literal name), then DATA.
    const GRPCIO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00$\x04\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x04\x00@\x00\x00\x00\x05\x00@\x00\x00\x00\x06\x00\x00@\x00\xfe\x03\x00\x00\x00\x01\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00?\x00\x01\x00\x00\x00\x04\x01\x00\x00\x00\x00\x00\x00\xe2\x01\x04\x00\x00\x00\x01@\x05:path\x14/SpiffeWorkloadAPI/X@\n:authority\x0ftmp%2Fdump.sock\x83\x86@\x0ccontent-type\x10application/grpc@\x02te\x08trailers@\x14grpc-accept-encoding\x17identity, deflate, gzip@\x0cgrpc-timeout\x022S@\nuser-agent0grpc-python/1.85.3 grpc-c/58.0.0 (linux; chttp2)\x00\x00\x05\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00";

    fn through(chunks: &[&[u8]]) -> Vec<u8> {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c, &mut out);
        }
        out
    }

    #[test]
    fn a_grpcio_authority_holding_the_socket_path_is_made_parseable_and_nothing_else_changes() {
        let out = through(&[GRPCIO]);
        assert_eq!(out.len(), GRPCIO.len());
        let changed: Vec<usize> = (0..out.len()).filter(|i| out[*i] != GRPCIO[*i]).collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(out[changed[0]], b'_');
        assert_eq!(GRPCIO[changed[0]], b'%');
        // The rewritten authority is one the http crate (hence h2) accepts; the original is not.
        assert!(http::uri::Authority::try_from("tmp%2Fdump.sock").is_err());
        assert!(http::uri::Authority::try_from("tmp_2Fdump.sock").is_ok());
    }

    #[test]
    fn the_stream_is_rewritten_the_same_whatever_the_read_sizes() {
        let whole = through(&[GRPCIO]);
        for size in [1, 2, 7, 9, 24, 100] {
            let chunks: Vec<&[u8]> = GRPCIO.chunks(size).collect();
            assert_eq!(through(&chunks), whole, "chunks of {size}");
        }
    }

    #[test]
    fn a_header_block_split_into_continuation_frames_is_rewritten_across_the_split() {
        // HEADERS (no END_HEADERS) with `:authority` by static name index 1, its value cut in
        // two, the rest in a CONTINUATION frame (END_HEADERS).
        let value = b"run%2Fspire%2Fagent.sock";
        let mut block = vec![0x41, value.len() as u8];
        block.extend_from_slice(value);
        let (a, b) = block.split_at(10);
        let mut stream = PREFACE.to_vec();
        stream.extend_from_slice(&[0, 0, a.len() as u8, HEADERS, 0, 0, 0, 0, 1]);
        stream.extend_from_slice(a);
        stream.extend_from_slice(&[0, 0, b.len() as u8, CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
        stream.extend_from_slice(b);
        let out = through(&[&stream]);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches('%').count(), 0, "{text}");
        assert_eq!(out.len(), stream.len());
        // A Huffman-coded value and other headers' `%` are left alone.
        let mut other = vec![0x40, 4];
        other.extend_from_slice(b"x-id");
        other.extend_from_slice(&[3, b'a', b'%', b'b']);
        let mut at = Vec::new();
        scan(&other, &mut at);
        assert!(at.is_empty());
        let huffman = [0x41, 0x82, b'%', b'%'];
        scan(&huffman, &mut at);
        assert!(at.is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        for seed in 0u8..=255 {
            let junk: Vec<u8> = (0..300u16)
                .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let mut at = Vec::new();
            scan(&junk, &mut at);
            let mut stream = PREFACE.to_vec();
            stream.extend_from_slice(&junk);
            let _ = through(&[&stream]);
        }
    }
}
