"""SSRF: image URLs never make the worker reach loopback, private or link-local addresses unless
the URL's host is allow-listed by name (exactly).

Through a real worker process: numeric host forms, URL tricks, redirects, https with the host
name kept for SNI and certificate checks. DNS names resolving to private addresses cannot be
staged offline (no DNS here is ours to control), so those cases run in-process against
:mod:`worker.media` with its resolver hook (``MediaPolicy.resolver``) answering, still fetching
from real local servers."""

from __future__ import annotations

import asyncio
import datetime
import http.server
import io
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from PIL import Image
from procs import start_worker

from clusterkit.errors import APIError
from worker.media import MediaPolicy, host_listing, is_public_address, load_image


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class Recorder:
    """A real HTTP(S) server on a loopback address that records every request (path, Host header,
    TLS SNI) and answers each with an image, so a fetch that reaches it succeeds visibly;
    ``/redirect?to=URL`` answers 302 to URL."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.hits: list[tuple[str, str | None]] = []
        self.sni: list[str | None] = []
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rec.hits.append((self.path, self.headers.get("Host")))
                q = parse_qs(urlparse(self.path).query)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", q["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self.srv = Server((host, 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.srv.socket = tls.wrap_socket(self.srv.socket, server_side=True)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _tls_files(tmp: Path) -> tuple[Path, dict[str, ssl.SSLContext]]:
    """A test CA (its PEM file) and server contexts with certificates it signed, by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmc test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    contexts = {}
    for dns in ("localhost", "wrong.example"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        chain = tmp / f"{dns}.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain)
        contexts[dns] = ctx
    return ca_file, contexts


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssrf-tls")
    ca_file, tls = _tls_files(tmp)
    out = {"images": Recorder(), "trap": Recorder(), "trap6": Recorder("::1"),
           "tls": Recorder(tls=tls["localhost"]), "tls_wrong": Recorder(tls=tls["wrong.example"]), "ca": ca_file}
    yield out
    for v in out.values():
        if isinstance(v, Recorder):
            v.close()


@pytest.fixture(scope="module")
def worker(model_dir, servers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssrf-worker")
    # "0.0.1" is a suffix of 127.0.0.1: a host that is an IP must never match an entry as a
    # subdomain would.
    yaml = "  allowed_image_domains: [localhost, 0.0.1]\n  max_image_pixels: 200000\n"
    proc, url = start_worker(tmp, f"vl={model_dir / 'tiny-qwen2-vl'}", worker_yaml=yaml,
                             env={"SSL_CERT_FILE": str(servers["ca"])})
    yield url
    proc.stop()


def chat(worker: str, url: str) -> httpx.Response:
    return httpx.post(f"{worker}/v1/chat/completions", timeout=60, json={
        "model": "vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]}]})


def refused(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == "messages"
    return err


def test_allow_listed_name_is_fetched(worker, servers):
    img = servers["images"]
    r = chat(worker, f"http://localhost:{img.port}/cat.png")
    assert r.status_code == 200, r.text
    assert img.hits[-1] == ("/cat.png", f"localhost:{img.port}")


def test_numeric_and_disguised_loopback_hosts_are_never_fetched(worker, servers):
    t, t6 = servers["trap"].port, servers["trap6"].port
    urls = [f"http://127.0.0.1:{t}/", f"http://0x7f000001:{t}/", f"http://0x7F.0.0.1:{t}/",
            f"http://2130706433:{t}/", f"http://0177.0.0.1:{t}/", f"http://127.1:{t}/", f"http://127.0.1:{t}/",
            f"http://0:{t}/", f"http://0.0.0.0:{t}/", f"http://[::ffff:127.0.0.1]:{t}/",
            f"http://[::ffff:7f00:1]:{t}/", f"http://[::1]:{t6}/", f"http://[0:0:0:0:0:0:0:1]:{t6}/",
            f"http://[::]:{t6}/", f"http://localhost:{t}@127.0.0.1:{t}/", f"http://localhost@127.0.0.1:{t}/",
            f"http://127.0.0.1:{t}\\@localhost/", f"http://localhost#@127.0.0.1:{t}/",
            f"https://127.0.0.1:{t}/", f"http://127.0.0.1.:{t}/"]
    codes = {}
    for u in urls:
        codes[u] = refused(chat(worker, u))["code"]
    assert servers["trap"].hits == [] and servers["trap6"].hits == []
    # Hosts that are not the allow-listed name are refused by name, before any connection.
    assert all(codes[u] == "image_url_not_allowed" for u in urls if "localhost" not in u), codes


def test_redirects_are_not_followed(worker, servers):
    img, trap = servers["images"], servers["trap"]
    before = len(img.hits)
    for target in (f"http://127.0.0.1:{trap.port}/x", f"http://[::1]:{servers['trap6'].port}/x",
                   f"http://localhost:{img.port}/cat.png"):
        err = refused(chat(worker, f"http://localhost:{img.port}/redirect?to={target}"))
        assert "redirect" in err["message"]
    assert [p for p, _ in img.hits[before:]] == [p for p, _ in img.hits[before:] if p.startswith("/redirect")]
    assert len(img.hits) - before == 3 and trap.hits == [] and servers["trap6"].hits == []


def test_https_keeps_the_host_name_for_sni_and_certificate(worker, servers):
    tls, wrong = servers["tls"], servers["tls_wrong"]
    r = chat(worker, f"https://localhost:{tls.port}/cat.png")
    assert r.status_code == 200, r.text
    assert tls.sni == ["localhost"] and tls.hits == [("/cat.png", f"localhost:{tls.port}")]
    # A certificate for another name fails verification: nothing is fetched.
    err = refused(chat(worker, f"https://localhost:{wrong.port}/cat.png"))
    assert err["code"] == "invalid_image" and wrong.hits == [] and wrong.sni == ["localhost"]


def test_worker_keeps_serving(worker, servers):
    r = chat(worker, f"http://localhost:{servers['images'].port}/cat.png")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# -- names resolving to private addresses (in-process, the resolver hook answers) ----------------

class FakeDNS:
    """The resolver hook: fixed answers per name; records every lookup."""

    def __init__(self, answers: dict[str, list[list[str]]]):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        seq = self.answers.get(host)
        if not seq:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return seq.pop(0) if len(seq) > 1 else seq[0]


def fetch(url: str, allowed: list[str], dns: FakeDNS, timeout: float = 10.0):
    policy = MediaPolicy(allowed_domains=allowed, resolver=dns, fetch_timeout=timeout)
    return asyncio.run(load_image({"image_url": {"url": url}}, policy))


@pytest.mark.parametrize("addrs", [["127.0.0.1"], ["10.0.0.7"], ["172.16.3.4"], ["192.168.1.20"],
                                   ["169.254.169.254"], ["100.64.0.1"], ["0.0.0.0"], ["224.0.0.251"],
                                   ["::1"], ["fe80::1"], ["fd00::5"], ["::ffff:127.0.0.1"], ["::"],
                                   ["93.184.216.34", "127.0.0.1"]])
def test_subdomain_resolving_to_a_private_address_is_refused(servers, addrs):
    trap = servers["trap"]
    dns = FakeDNS({"img.example.com": [addrs]})
    with pytest.raises(APIError) as e:
        fetch(f"http://img.example.com:{trap.port}/cat.png", ["example.com"], dns)
    assert e.value.status == 400 and e.value.code == "image_url_not_allowed"
    assert "127.0.0.1" not in e.value.message and dns.lookups == ["img.example.com"]
    assert trap.hits == []


def test_exactly_listed_name_may_resolve_privately_and_the_checked_address_is_used(servers):
    img = servers["images"]
    # The system resolver knows no "images.internal": a fetch that looked the name up again
    # would fail, so success shows the connection went to the address that was checked.
    dns = FakeDNS({"images.internal": [["::1", "127.0.0.1"]]})  # nothing listens on ::1 there
    image, raw = fetch(f"http://images.internal:{img.port}/pinned.png", ["images.internal"], dns)
    assert raw == PNG and image.size == (32, 24)
    assert img.hits[-1] == ("/pinned.png", f"images.internal:{img.port}")
    assert dns.lookups == ["images.internal"]
    # Listed as a domain only, the same name's subdomain may not go there.
    dns = FakeDNS({"a.images.internal": [["127.0.0.1"]]})
    with pytest.raises(APIError) as e:
        fetch(f"http://a.images.internal:{img.port}/sub.png", ["images.internal"], dns)
    assert e.value.code == "image_url_not_allowed" and img.hits[-1][0] == "/pinned.png"


def test_dns_rebinding_after_the_check_is_never_followed(servers):
    trap = servers["trap"]
    # The first answer is public (it passes the check) but unreachable from here, every later one
    # is loopback: a client that looked the name up again to connect would reach the trap.
    dns = FakeDNS({"cdn.example.com": [["1.0.0.1"], ["127.0.0.1"]]})
    with pytest.raises(APIError) as e:
        fetch(f"http://cdn.example.com:{trap.port}/x.png", ["example.com"], dns, timeout=3)
    assert e.value.code == "invalid_image"  # could not fetch (or took too long), not refused
    assert dns.lookups == ["cdn.example.com"] and trap.hits == []


def test_address_and_name_rules():
    for a in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert is_public_address(a), a
    for a in ("127.0.0.1", "127.255.0.1", "10.1.2.3", "172.31.255.255", "192.168.0.1", "169.254.169.254",
              "100.64.0.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1",
              "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "ff02::1",
              "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "not an ip"):
        assert not is_public_address(a), a
    allowed = ["localhost", "Example.COM.", "0.0.1", "[::1]"]
    assert host_listing("localhost", allowed) == host_listing("LOCALHOST.", allowed) == "exact"
    assert host_listing("example.com", allowed) == "exact"
    assert host_listing("img.example.com", allowed) == "domain"
    assert host_listing("::1", allowed) == "exact"
    for h in ("badexample.com", "127.0.0.1", "2130706433", "0x7f000001", "127.1", "a.localhost.evil"):
        assert host_listing(h, allowed) is None, h
