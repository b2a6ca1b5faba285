"""Where a sidecar's CPU goes, by component, from `perf script` call stacks (bench/run --profile).

Each sample is charged to one component, the first one found walking its stack from the leaf
towards the root ("self" view): a sample in `malloc` called by serde_json is allocation, one in
serde_json's own code is the audit record. The "inclusive" view counts a sample for every
component that appears anywhere on its stack (audit including the allocations it makes).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# (component, description, frame pattern): the first pattern matching a frame names it. Order
# matters: the leaf-most match wins for the self view, so specific libraries come first.
COMPONENTS: list[tuple[str, str, re.Pattern]] = [
    ("kernel", "syscalls, loopback TCP, epoll, scheduler", re.compile(r"^\[kernel\]")),
    ("alloc", "allocation (malloc, free, realloc)",
     re.compile(r"^(_int_malloc|_int_free|malloc|free|cfree|realloc|_int_realloc|calloc|__libc_(malloc|free|"
                r"calloc|realloc)|malloc_consolidate|unlink_chunk|tcache_|__rust_(alloc|dealloc|realloc)|"
                r"alloc::alloc::|_ZN5alloc5alloc|mi_|je_|_rjem_)")),
    ("memcpy", "memcpy/memmove (buffer and header copies)", re.compile(r"^__mem(move|cpy|set)|^mem(cpy|move|set)")),
    ("tls", "rustls record layer and AES-GCM (aws-lc-rs)",
     re.compile(r"rustls|aws_lc|aes_|gcm_|ring::|GFp_|_aesni_|aesni_|ghash")),
    ("audit", "the audit record: JSON fields, encode, SHA-256 chain, spool write, shipping",
     re.compile(r"serde_json|sha2|sha256|mayfly_sidecar::audit|mayfly_ca::audit|conn::http::record|audit_base|"
                r"audit_into|sha256_block")),
    ("policy", "policy decision", re.compile(r"mayfly_policy|mayfly_sidecar::policy")),
    ("metrics", "metrics (prometheus-client label sets)", re.compile(r"prometheus_client|mayfly_sidecar::metrics")),
    ("h2", "HTTP/2 framing (the hop between sidecars, or h2c)", re.compile(r"(^|[^a-z_])h2::|hpack")),
    ("h1", "HTTP/1.1 parsing and encoding", re.compile(r"httparse|hyper::proto::h1")),
    ("hyper", "hyper/hyper-util: dispatch, client pool, bodies", re.compile(r"hyper|http_body|tower")),
    ("runtime", "tokio runtime: tasks, timers, I/O driver", re.compile(r"tokio|mio::")),
    ("mayfly", "mayfly's own proxy code (checks, headers, routing; the task roots)", re.compile(r"mayfly")),
]
OTHER = ("other", "libc, std, frames the unwinder could not name")
DESCRIPTIONS = dict([(c, d) for c, d, _ in COMPONENTS] + [OTHER])


def component(frame: str) -> str | None:
    for name, _, pat in COMPONENTS:
        if pat.search(frame):
            return name
    return None


_FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")


def stacks(perf_data: Path, timeout: float = 600) -> list[list[str]]:
    """Each sample's frames, leaf first; kernel frames as `[kernel] sym`."""
    r = subprocess.run(["perf", "script", "-i", str(perf_data), "-F", "ip,sym,dso", "--no-inline"],
                       capture_output=True, text=True, timeout=timeout)
    out: list[list[str]] = []
    cur: list[str] = []
    for line in r.stdout.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
                cur = []
            continue
        m = _FRAME.match(line)
        if not m:
            continue
        sym, dso = m.group(1), m.group(2)
        sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
        # Only the kernel's own frames: `[unknown]` is a user frame the unwinder could not name.
        cur.append(f"[kernel] {sym}" if "kernel.kallsyms" in dso or dso.startswith("[kernel") else sym)
    if cur:
        out.append(cur)
    return out


def shares(samples: list[list[str]]) -> tuple[dict[str, float], dict[str, float]]:
    """(self, inclusive) share of samples per component, in %."""
    n = len(samples) or 1
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames in samples:
        names = [component(f) for f in frames]
        first = next((c for c in names if c), OTHER[0])
        own[first] = own.get(first, 0) + 1
        for c in set(c for c in names if c):
            incl[c] = incl.get(c, 0) + 1
    return ({c: 100 * v / n for c, v in own.items()}, {c: 100 * v / n for c, v in incl.items()})


def leaf_symbols(samples: list[list[str]], top: int = 30) -> list[list]:
    """Self cost per leaf symbol, in % of samples."""
    n = len(samples) or 1
    counts: dict[str, int] = {}
    for frames in samples:
        if frames:
            sym = re.sub(r"::h[0-9a-f]{16}$", "", frames[0])
            counts[sym] = counts.get(sym, 0) + 1
    return [[s, round(100 * c / n, 2)] for s, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]
