#!/usr/bin/env python3
"""Call another meshed service with the app's OWN certificate, from the SPIFFE Workload API.

The app fetches its X.509-SVID and the trust bundle from its sidecar's Workload API socket
(py-spiffe, `pip install spiffe`), then opens TLS straight to the other service's sidecar
(its mTLS inbound port): it presents its own certificate chain, verifies the server against the
fetched bundle and checks the server's SPIFFE ID (its URI SAN). The callee's sidecar verifies
the app's certificate and applies its policy to the app's SPIFFE ID, as for any sidecar.

    SPIFFE_ENDPOINT_SOCKET=unix:///run/spiffe/workload.sock \\
    python3 call_with_own_svid.py https://10.0.0.2:15443/whoami spiffe://mayfly.local/orders

Prints the HTTP status and body, and the SHA-256 of the app's own leaf certificate (the `Hash`
the callee's sidecar puts in `x-forwarded-client-cert`). Exit status: 0 on a 2xx answer,
1 on another answer (403: the callee's policy refused this app), 2 when no call was possible
(no SVID, TLS failure, the server is not the expected SPIFFE ID).

The private key never touches the disk. Python's `ssl` loads a key only from a file path
(`SSLContext.load_cert_chain`; `ssl.MemoryBIO` carries the TLS records, not the key), so the
PEM key and chain are each written into an anonymous pipe and OpenSSL reads them through
`/dev/fd/N`: nothing is created on any file system, nothing is left behind if the process dies,
and no other user can open the pipe. (A 0600 file in a private temporary directory, removed
at once, would be the fallback on a system without `/dev/fd`; it still reaches the disk.)
"""

import argparse
import hashlib
import http.client
import os
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from spiffe import WorkloadApiClient


def through_pipe(data):
    """A path from which `data` can be read once: the read end of a pipe, fed by a thread
    (a write larger than the pipe's buffer would otherwise block before OpenSSL reads)."""
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as out:
            try:
                out.write(data)
            except BrokenPipeError:
                pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return r, t


def client_context(svid, bundle):
    """TLS client context: the app's own chain and key, the bundle as the only trust anchors."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # SPIFFE names a server by the URI SAN of its SVID, not by a DNS name: the chain is
    # verified against the bundle here, the SPIFFE ID is checked after the handshake.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(
        cadata="".join(c.public_bytes(Encoding.PEM).decode() for c in bundle.x509_authorities)
    )
    chain = b"".join(c.public_bytes(Encoding.PEM) for c in svid.cert_chain)
    key = svid.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    (chain_fd, t1), (key_fd, t2) = through_pipe(chain), through_pipe(key)
    try:
        ctx.load_cert_chain(certfile=f"/dev/fd/{chain_fd}", keyfile=f"/dev/fd/{key_fd}")
    finally:
        os.close(chain_fd)
        os.close(key_fd)
        t1.join()
        t2.join()
    del key
    return ctx


def uri_sans(der):
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def fetch(socket, timeout):
    """The app's SVID and the trust bundles. Until the sidecar has obtained the app's first
    SVID it answers PermissionDenied "no identity issued", as the SPIFFE Workload API says:
    a transient state, retried here (py-spiffe's one-shot fetch does not) until `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    client = WorkloadApiClient(socket_path=socket)
    try:
        while True:
            try:
                svid = client.fetch_x509_svid(timeout=max(deadline - time.monotonic(), 0.1))
                break
            except Exception as e:
                if "no identity issued" not in str(e) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        bundles = client.fetch_x509_bundles(timeout=max(deadline - time.monotonic(), 0.1))
        return svid, bundles
    finally:
        client.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="https://HOST:PORT/PATH of the other service's sidecar (its mTLS inbound)")
    p.add_argument("server_id", help="the SPIFFE ID the server must present, e.g. spiffe://mayfly.local/orders")
    p.add_argument("--socket", help="the Workload API socket, unix:///PATH (default: $SPIFFE_ENDPOINT_SOCKET)")
    p.add_argument("--method", default="GET")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    url = urlsplit(args.url)
    if url.scheme != "https" or not url.hostname or not url.port:
        sys.exit(f"error: {args.url}: expected https://HOST:PORT/PATH")

    try:
        svid, bundles = fetch(args.socket, args.timeout)
    except Exception as e:  # py-spiffe raises its own error types for every gRPC failure
        print(f"error: no SVID from the Workload API: {e}", file=sys.stderr)
        return 2
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if bundle is None:
        print(f"error: no bundle for {svid.spiffe_id.trust_domain}", file=sys.stderr)
        return 2
    leaf = svid.leaf.public_bytes(Encoding.DER)
    print(f"my SPIFFE ID: {svid.spiffe_id}")
    print(f"my certificate SHA-256: {hashlib.sha256(leaf).hexdigest()}")

    conn = http.client.HTTPSConnection(
        url.hostname, url.port, context=client_context(svid, bundle), timeout=args.timeout
    )
    try:
        conn.connect()
        server = uri_sans(conn.sock.getpeercert(binary_form=True))
        if server != [args.server_id]:
            print(f"error: the server is {server}, not {args.server_id}: not calling it", file=sys.stderr)
            return 2
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        conn.request(args.method, path)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        print(f"error: calling {args.url}: {e}", file=sys.stderr)
        return 2
    finally:
        conn.close()
    print(f"status: {resp.status}")
    decision = resp.getheader("x-mayfly-decision-id")
    if decision:
        print(f"decision: {decision}")
    print(body)
    return 0 if 200 <= resp.status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
