#!/usr/bin/env python3
"""Connection-level attacks against the real binary, measured from outside.

For each attack class it reports what another client's cache hit took during the attack
(p50/max, a fresh connection per probe, every probe must be 200), the gateway's open
descriptors (/proc/PID/fd) before, at the peak of and after the attack, and the peak
resident memory (VmHWM) of the gateway process at the end of the run.

    cargo build --release && python3 benches/connections.py [--binary target/release/cxgate]

Everything runs on 127.0.0.1; every loop is bounded and every process started here is
stopped by its pid. Only the Python standard library is used. The upstream is a small
server in this script: `/me` answers a small JSON body, `/big/N` a 32 MiB one (sent in
1 MiB pieces, 20 ms apart, so many are held at once): the hostile-upstream case.
"""

import argparse
import asyncio
import http.client
import http.server
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIG = 32 << 20
PIECE = 1 << 20
KEY = "bench-key"
OTHER = "other-key"
TOKEN = "bench-upstream-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    piece = b" " * PIECE

    def do_GET(self):
        if self.path.startswith("/big/"):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(BIG))
            self.end_headers()
            try:
                for _ in range(BIG // PIECE):
                    self.wfile.write(self.piece)
                    time.sleep(0.02)
            except OSError:
                pass
            return
        body = json.dumps({"meta": {"code": 200}, "response": {"id": 1}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def sha256(text):
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def status_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def probe(port, path="/me", key=OTHER, timeout=30):
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - started
    except OSError as e:
        return f"error {e}", time.monotonic() - started
    finally:
        conn.close()


class Prober(threading.Thread):
    """Probes a cache hit and /healthz every 50 ms until stopped; samples fds meanwhile."""

    def __init__(self, port, admin_port, pid):
        super().__init__(daemon=True)
        self.port, self.admin_port, self.pid = port, admin_port, pid
        self.hits, self.kept, self.health, self.bad, self.peak_fds = [], [], [], [], 0
        self.stop = threading.Event()
        self.conn = None

    def keep_alive_hit(self):
        started = time.monotonic()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.request("GET", "/me", headers={"Authorization": f"Bearer {OTHER}"})
            resp = self.conn.getresponse()
            resp.read()
            return resp.status, time.monotonic() - started
        except (OSError, http.client.HTTPException) as e:
            self.conn = None
            return f"keep-alive error {e}", time.monotonic() - started

    def run(self):
        while not self.stop.is_set():
            status, took = probe(self.port)
            (self.hits if status == 200 else self.bad).append((status, took))
            status, took = self.keep_alive_hit()
            (self.kept if status == 200 else self.bad).append((status, took))
            status, took = probe(self.admin_port, "/healthz", key="")
            (self.health if status == 200 else self.bad).append((status, took))
            self.peak_fds = max(self.peak_fds, fds(self.pid))
            time.sleep(0.05)


async def silent(port, n, hold):
    conns = []
    for _ in range(n):
        try:
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            break
    await asyncio.sleep(hold)
    for _, w in conns:
        w.close()
    return len(conns)


async def slow_head(port, n, hold):
    async def one():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        w.write(b"GET /me HTTP/1.1\r\nHost: gw\r\n")
        end = time.monotonic() + hold
        i = 0
        while time.monotonic() < end:
            await asyncio.sleep(0.5)
            try:
                w.write(f"x-{i}: 1\r\n".encode())
                await w.drain()
            except OSError:
                return
            i += 1
        w.close()

    await asyncio.gather(*(one() for _ in range(n)))


async def slow_body(port, n, hold):
    async def one():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        w.write(
            f"GET /me HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {OTHER}\r\n"
            f"Content-Length: 100000\r\n\r\n".encode()
        )
        end = time.monotonic() + hold
        while time.monotonic() < end:
            await asyncio.sleep(0.5)
            try:
                w.write(b"x")
                await w.drain()
            except OSError:
                return
        w.close()

    await asyncio.gather(*(one() for _ in range(n)))


def big_answers(port, n):
    results = []

    def one(i):
        status, took = probe(port, f"/big/{i}", key=KEY, timeout=120)
        results.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summary(name, prober, before, after):
    hits = sorted(t for _, t in prober.hits)
    kept = sorted(t for _, t in prober.kept)
    health = sorted(t for _, t in prober.health)

    def ms(xs, q):
        if not xs:
            return float("nan")
        return 1000 * (statistics.median(xs) if q == 50 else xs[-1])

    print(
        f"{name}\n  hit, new connection: p50 {ms(hits, 50):.1f} ms, max {ms(hits, 100):.1f} ms; "
        f"hit, keep-alive: p50 {ms(kept, 50):.1f} ms, max {ms(kept, 100):.1f} ms; "
        f"healthz max {ms(health, 100):.1f} ms; {len(hits) + len(kept)} ok, {len(prober.bad)} failed\n"
        f"  gateway fds: before {before}, peak {prober.peak_fds}, after {after}"
    )
    if prober.bad:
        print(f"  failed probes: {prober.bad[:5]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/cxgate")
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--hold", type=float, default=8.0, help="seconds each attack lasts")
    ap.add_argument("--big", type=int, default=24, help="concurrent 32 MiB answers")
    args = ap.parse_args()

    up_port = free_port()
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", up_port), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()

    port, admin_port = free_port(), free_port()
    work = tempfile.mkdtemp(prefix="cxgate-conn-bench-")
    config = os.path.join(work, "cxgate.toml")
    with open(config, "w") as f:
        f.write(
            f"""[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
max_concurrency = 64
header_timeout = "2s"
body_timeout = "10s"
idle_timeout = "5s"
max_connections = 1000
[upstream]
base_url = "http://127.0.0.1:{up_port}"
timeout = "60s"
[token]
access_token_env = "CXGATE_BENCH_TOKEN"
[budget]
limit = 1000000
period = "1s"
burst = 100000
[[clients]]
name = "bench"
key_sha256 = "{sha256(KEY)}"
scopes = ["read", "write"]
[[clients]]
name = "other"
key_sha256 = "{sha256(OTHER)}"
scopes = ["read"]
[[routes]]
match = "GET /me"
ttl = "10m"
"""
        )
    env = dict(os.environ, CXGATE_BENCH_TOKEN=TOKEN)
    log = open(os.path.join(work, "cxgate.log"), "w")
    gw = subprocess.Popen([args.binary, "run", "--config", config], env=env, stderr=log, stdout=log)
    try:
        for _ in range(100):
            if probe(admin_port, "/healthz", key="", timeout=1)[0] == 200:
                break
            time.sleep(0.1)
        assert probe(port)[0] == 200, "priming GET /me"
        print(
            f"cxgate connection attacks: {args.connections} connections, {args.hold:.0f} s each, "
            "header_timeout 2s, idle_timeout 5s, body_timeout 10s, max_connections 1000, "
            "max_concurrency 64"
        )
        attacks = [
            ("class 3: silent connections", lambda: asyncio.run(silent(port, args.connections, args.hold))),
            ("class 3: slow heads", lambda: asyncio.run(slow_head(port, args.connections // 4, args.hold))),
            ("class 2: slow bodies (HTTP/1.1)", lambda: asyncio.run(slow_body(port, args.connections // 4, args.hold))),
            (f"class 8: {args.big} x 32 MiB answers", lambda: print(f"  big answers: {big_answers(port, args.big)}")),
        ]
        for name, attack in attacks:
            before = fds(gw.pid)
            prober = Prober(port, admin_port, gw.pid)
            prober.start()
            attack()
            prober.stop.set()
            prober.join()
            time.sleep(6)  # past idle_timeout: what stays open after the attack
            summary(name, prober, before, fds(gw.pid))
        print(
            f"gateway VmHWM {status_kb(gw.pid, 'VmHWM') / 1024:.0f} MiB, "
            f"VmRSS now {status_kb(gw.pid, 'VmRSS') / 1024:.0f} MiB"
        )
    finally:
        gw.terminate()
        try:
            gw.wait(timeout=15)
        except subprocess.TimeoutExpired:
            gw.kill()
        upstream.shutdown()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
