#!/usr/bin/env bash
# Side-by-side load harness: cxgate against nginx proxy_cache and Varnish, on loopback, in one
# run, so the machine state is the same for all three.
#
# It writes every config into a temporary directory and starts:
#   - the origin: an nginx answering `return 200` with a 1.5 KB JSON body (the fairest static
#     upstream, and, called directly, the ceiling for any proxy on this machine); it forwards
#     every other path to the simulator;
#   - the simulator (`cxgate sim --latency 100ms`): the slow upstream for the cold burst;
#   - cxgate, nginx (proxy_cache + proxy_cache_lock) and Varnish, each caching the same keys
#     for the same TTL (1 h) in front of the origin.
# Then, for each round, the same wrk load runs against direct, cxgate, nginx and Varnish in
# alternation; the table shows the medians over the rounds. Every process it started is
# stopped by process id on exit.
#
# After those, the scenario sweep: one hot key at each of --sweep connection counts, 20,000
# keys (--keys) warmed beforehand and read at random, and a 64 KB body, each against every
# proxy in alternation, with per-round ratios to nginx. With --logs a second cxgate and a
# second nginx log every request to a file (cxgate `server.access_log`, nginx `access_log`,
# its default unbuffered combined format); the sweep and the hit table then show both, and
# each ratio compares like with like (logging cxgate against logging nginx). Without --logs
# no proxy logs requests. Varnish is measured when `varnishd` is installed (never with
# --logs: its request log is a separate reader, varnishncsa, not the proxy).
#
# Usage: benches/compare.sh [--duration SECONDS] [--rounds N] [--connections N] [--threads N]
#                           [--sweep "32 512 4096"] [--keys N] [--no-sweep] [--logs] [--keep]
# Needs Debian's nginx, wrk, plus curl and python3 (varnish optional). CXGATE_BIN names a
# prebuilt binary; without it the script runs `cargo build --release` first.
set -euo pipefail

DURATION=10        # seconds per hit run
ROUNDS=3
CONNECTIONS=128
THREADS=2
OVERHEAD_DURATION=5  # seconds per single-connection uncached run
BURST=200          # concurrent cold readers
BODY_BYTES=1536
BIG_BYTES=65536    # the large-body scenario
SWEEP="32 512 4096"
KEYS=20000
SCENARIOS=1
LOGS=0
KEEP=0
TOKEN="compare-token-$$"

usage() {
    sed -n '/^# Usage:/,/^# prebuilt binary/p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --connections) CONNECTIONS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --sweep) SWEEP="$2"; shift 2 ;;
        --keys) KEYS="$2"; shift 2 ;;
        --no-sweep) SCENARIOS=0; shift ;;
        --logs) LOGS=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

# Fail before starting anything when a tool is missing, and name the package that has it.
missing=()
for tool in nginx:nginx wrk:wrk curl:curl python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
VARNISH=0
if command -v varnishd >/dev/null 2>&1 && [ "$LOGS" = 0 ]; then
    VARNISH=1
    # Varnish compiles its VCL to C at start, so it needs a C compiler.
    command -v cc >/dev/null 2>&1 || missing+=("gcc")
elif [ "$LOGS" = 0 ]; then
    echo "compare.sh: varnishd not found (apt-get install -y varnish): measuring without it" >&2
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "compare.sh: missing: ${missing[*]}" >&2
    echo "  install with: apt-get install -y ${missing[*]}" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${CXGATE_BIN:-}" ]; then
    BIN="$CXGATE_BIN"
else
    echo "building cxgate (release)..." >&2
    (cd "$ROOT" && cargo build --release --quiet --bin cxgate)
    BIN="$ROOT/target/release/cxgate"
fi
[ -x "$BIN" ] || { echo "compare.sh: no cxgate binary at $BIN" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cxgate-compare.XXXXXX")"
PIDS=()

# Stop what we started, newest first, by PID: TERM, a grace period, then KILL.
cleanup() {
    local status=$? pid i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ]; then
        echo "configs and logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
    echo "compare.sh: $*" >&2
    exit 1
}

# Distinct free loopback ports: all sockets stay bound until every port is chosen.
read -r P_ORIGIN P_SIM P_CXGATE P_ADMIN P_NGINX P_VARNISH P_CXLOG P_ADMINLOG P_NGINXLOG \
    < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)

# ---------------------------------------------------------------- configs
mkdir -p "$WORK/origin/static/bench" "$WORK/nginx/cache" "$WORK/varnish" "$WORK/cxgate" \
    "$WORK/nginxlog/cache" "$WORK/cxgatelog"

# A 1.5 KB body in the CX Social envelope; no `$` or `'` so nginx can `return` it verbatim.
BODY="$(python3 - "$BODY_BYTES" <<'EOF'
import json, sys
size = int(sys.argv[1])
doc = {"meta": {"code": 200}, "response": {"id": 1, "name": "Compare harness", "bio": ""}}
base = len(json.dumps(doc, separators=(",", ":")))
doc["response"]["bio"] = "x" * (size - base)
print(json.dumps(doc, separators=(",", ":")), end="")
EOF
)"
[ "${#BODY}" -eq "$BODY_BYTES" ] || die "body is ${#BODY} bytes, expected $BODY_BYTES"
# The large body is a file the origin serves; same envelope.
python3 - "$BIG_BYTES" >"$WORK/origin/static/bench/big" <<'EOF'
import json, sys
size = int(sys.argv[1])
doc = {"meta": {"code": 200}, "response": {"id": 2, "name": "Compare harness", "bio": ""}}
base = len(json.dumps(doc, separators=(",", ":")))
doc["response"]["bio"] = "y" * (size - base)
print(json.dumps(doc, separators=(",", ":")), end="")
EOF

# As root, nginx workers would drop to an unprivileged user that cannot write the cache
# directory inside our 0700 temporary directory.
NGINX_USER=""
[ "$(id -u)" = 0 ] && NGINX_USER="user root;"

# Both nginx instances keep their temporary files in $WORK, never in /var/lib/nginx.
nginx_common() {
    local dir="$1"
    cat <<EOF
$NGINX_USER
worker_processes auto;
error_log $dir/error.log warn;
events { worker_connections 8192; }
EOF
}
nginx_http_common() {
    local dir="$1" log="${2:-off}"
    cat <<EOF
    access_log $log;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default; cxgate and
    # Varnish do not, so lift the cap to compare like with like.
    keepalive_requests 100000000;
EOF
}

cat >"$WORK/origin/nginx.conf" <<EOF
$(nginx_common "$WORK/origin")
http {
$(nginx_http_common "$WORK/origin")
    default_type application/json;
    upstream sim {
        server 127.0.0.1:$P_SIM;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$P_ORIGIN;
        # The direct ceiling: what wrk gets from nginx itself.
        location = /bench/direct { return 200 '$BODY'; }
        # What the proxies cache; logged so the harness can prove hits never reach here.
        location = /bench/hit {
            access_log $WORK/origin/hit.log;
            return 200 '$BODY';
        }
        # Never cached by any proxy: the uncached overhead.
        location = /bench/pass { return 200 '$BODY'; }
        # The many-keys scenario: any key under here, cached by every proxy.
        location /12345/inbox/contact/bench/ { return 200 '$BODY'; }
        # The large-body scenario.
        location = /bench/big {
            default_type application/json;
            root $WORK/origin/static;
        }
        # Everything else is the simulator (the cold burst's 100 ms upstream).
        location / {
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF

# The caching nginx; the second one (--logs) logs every request to a file.
nginx_proxy_conf() {
    local dir="$1" port="$2" log="$3"
    cat <<EOF
$(nginx_common "$dir")
http {
$(nginx_http_common "$dir" "$log")
    proxy_cache_path $dir/cache levels=1:2 keys_zone=bench:16m max_size=256m
                     inactive=2h use_temp_path=off;
    upstream origin {
        server 127.0.0.1:$P_ORIGIN;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # The proxy holds the upstream credential, as cxgate does.
        proxy_set_header Authorization "Bearer $TOKEN";
        location = /bench/pass { proxy_pass http://origin; }
        location / {
            proxy_pass http://origin;
            proxy_cache bench;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10s;
            proxy_cache_lock_age 10s;
            # Cache by our TTL alone, as cxgate's routes do.
            proxy_ignore_headers Cache-Control Expires Set-Cookie Vary X-Accel-Expires;
            add_header X-Cache \$upstream_cache_status;
        }
    }
}
EOF
}
nginx_proxy_conf "$WORK/nginx" "$P_NGINX" off >"$WORK/nginx/nginx.conf"
nginx_proxy_conf "$WORK/nginxlog" "$P_NGINXLOG" "$WORK/nginxlog/access.log" \
    >"$WORK/nginxlog/nginx.conf"

cat >"$WORK/varnish/default.vcl" <<EOF
vcl 4.1;
backend origin {
    .host = "127.0.0.1";
    .port = "$P_ORIGIN";
}
sub vcl_recv {
    unset req.http.Cookie;
    if (req.url ~ "^/bench/pass") { return (pass); }
    # The built-in rules would pass requests with Authorization; the proxy holds the credential.
    return (hash);
}
sub vcl_backend_fetch {
    set bereq.http.Authorization = "Bearer $TOKEN";
}
sub vcl_backend_response {
    if (bereq.uncacheable) { return (deliver); }
    unset beresp.http.Set-Cookie;
    set beresp.ttl = 1h;
    set beresp.grace = 0s;
    return (deliver);
}
sub vcl_deliver {
    if (obj.hits > 0) { set resp.http.X-Cache = "HIT"; } else { set resp.http.X-Cache = "MISS"; }
}
EOF

# No [[clients]]: the anonymous mode on loopback, so wrk needs no key. A budget no run
# reaches, so only caching is measured. The second one (--logs) logs every request to a file.
cxgate_conf() {
    local port="$1" admin="$2" log="$3"
    cat <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
max_concurrency = 8192
access_log = "$log"

[upstream]
base_url = "http://127.0.0.1:$P_ORIGIN"

[token]
access_token_env = "CXGATE_COMPARE_TOKEN"

[budget]
limit = 1000000
period = "1s"
burst = 100000

[[routes]]
match = "GET /bench/hit"
ttl = "1h"

[[routes]]
match = "GET /bench/big"
ttl = "1h"

[[routes]]
match = "GET /{account_id}/inbox/contact/{service}/{service_id}"
ttl = "1h"
EOF
}
cxgate_conf "$P_CXGATE" "$P_ADMIN" off >"$WORK/cxgate/cxgate.toml"
cxgate_conf "$P_CXLOG" "$P_ADMINLOG" "$WORK/cxgatelog/access.log" >"$WORK/cxgatelog/cxgate.toml"

# ---------------------------------------------------------------- start
# Waits until URL answers (any HTTP status), or fails naming the log of the process.
wait_up() {
    local name="$1" pid="$2" url="$3" log="$4"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "$name exited at start"; }
        curl -s -o /dev/null "$url" && return 0
        sleep 0.1
    done
    cat "$log" >&2
    die "$name did not answer at $url within 10 s"
}

"$BIN" --log-level warn sim --listen "127.0.0.1:$P_SIM" --access-token "$TOKEN" \
    --latency 100ms >"$WORK/sim.log" 2>&1 &
PIDS+=($!); SIM_PID=$!
wait_up simulator "$SIM_PID" "http://127.0.0.1:$P_SIM/_sim/stats" "$WORK/sim.log"

nginx -p "$WORK/origin" -c "$WORK/origin/nginx.conf" \
    -g "daemon off; pid $WORK/origin/nginx.pid;" >"$WORK/origin/stderr.log" 2>&1 &
PIDS+=($!); ORIGIN_PID=$!
wait_up "origin nginx" "$ORIGIN_PID" "http://127.0.0.1:$P_ORIGIN/bench/direct" \
    "$WORK/origin/stderr.log"

declare -A URL PID LABEL REF
# Access logging off (`server.access_log = "off"`, nginx `access_log off`): both would pay
# for a line per request otherwise. The --logs pair below writes one to a file.
CXGATE_COMPARE_TOKEN="$TOKEN" "$BIN" --log-level warn run --config "$WORK/cxgate/cxgate.toml" \
    >"$WORK/cxgate/stderr.log" 2>&1 &
PIDS+=($!); CXGATE_PID=$!
wait_up cxgate "$CXGATE_PID" "http://127.0.0.1:$P_ADMIN/healthz" "$WORK/cxgate/stderr.log"

nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" \
    -g "daemon off; pid $WORK/nginx/nginx.pid;" >"$WORK/nginx/stderr.log" 2>&1 &
PIDS+=($!); NGINX_PID=$!
wait_up nginx "$NGINX_PID" "http://127.0.0.1:$P_NGINX/bench/pass" "$WORK/nginx/stderr.log"

URL[direct]="http://127.0.0.1:$P_ORIGIN"; PID[direct]=$ORIGIN_PID
URL[cxgate]="http://127.0.0.1:$P_CXGATE"; PID[cxgate]=$CXGATE_PID
URL[nginx]="http://127.0.0.1:$P_NGINX"; PID[nginx]=$NGINX_PID
LABEL[direct]="direct (nginx return 200)"
LABEL[cxgate]="cxgate"
LABEL[nginx]="nginx proxy_cache"
# Each target's ratio is to the nginx that logs as it does.
REF[direct]=nginx; REF[cxgate]=nginx; REF[nginx]=nginx; REF[varnish]=nginx
PROXIES=(cxgate nginx)
TARGETS=(direct cxgate nginx)

if [ "$VARNISH" = 1 ]; then
    # -j none: no privilege separation, so the workdir may stay in our private temp directory.
    varnishd -F -j none -a "127.0.0.1:$P_VARNISH" -f "$WORK/varnish/default.vcl" \
        -s malloc,256m -n "$WORK/varnish" >"$WORK/varnish/stderr.log" 2>&1 &
    PIDS+=($!); VARNISH_PID=$!
    wait_up varnish "$VARNISH_PID" "http://127.0.0.1:$P_VARNISH/bench/pass" \
        "$WORK/varnish/stderr.log"
    URL[varnish]="http://127.0.0.1:$P_VARNISH"; PID[varnish]=$VARNISH_PID
    LABEL[varnish]="varnish"
    PROXIES+=(varnish)
    TARGETS+=(varnish)
fi

# The timed runs of the hit table and the sweep; the uncached and cold-burst runs keep to
# the proxies that do not log.
LOADED=("${PROXIES[@]}")
if [ "$LOGS" = 1 ]; then
    CXGATE_COMPARE_TOKEN="$TOKEN" "$BIN" --log-level warn run \
        --config "$WORK/cxgatelog/cxgate.toml" >"$WORK/cxgatelog/stderr.log" 2>&1 &
    PIDS+=($!); CXLOG_PID=$!
    wait_up "cxgate (logs)" "$CXLOG_PID" "http://127.0.0.1:$P_ADMINLOG/healthz" \
        "$WORK/cxgatelog/stderr.log"
    nginx -p "$WORK/nginxlog" -c "$WORK/nginxlog/nginx.conf" \
        -g "daemon off; pid $WORK/nginxlog/nginx.pid;" >"$WORK/nginxlog/stderr.log" 2>&1 &
    PIDS+=($!); NGINXLOG_PID=$!
    wait_up "nginx (logs)" "$NGINXLOG_PID" "http://127.0.0.1:$P_NGINXLOG/bench/pass" \
        "$WORK/nginxlog/stderr.log"
    URL[cxgate_log]="http://127.0.0.1:$P_CXLOG"; PID[cxgate_log]=$CXLOG_PID
    URL[nginx_log]="http://127.0.0.1:$P_NGINXLOG"; PID[nginx_log]=$NGINXLOG_PID
    LABEL[cxgate_log]="cxgate, access log file"
    LABEL[nginx_log]="nginx, access_log file"
    REF[cxgate_log]=nginx_log; REF[nginx_log]=nginx_log
    LOADED+=(cxgate_log nginx_log)
fi
HIT_TARGETS=(direct "${LOADED[@]}")

# ---------------------------------------------------------------- helpers
# The process and all its descendants (nginx master + workers, varnish manager + child).
tree() {
    local pid="$1" child
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        tree "$child"
    done
}

# CPU ticks (user + system) used so far by a process tree.
cpu_ticks() {
    local total=0 p stat rest
    for p in $(tree "$1"); do
        stat="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
        # Fields after the command name, which may hold spaces: utime is the 12th, stime the 13th.
        rest="${stat##*) }"
        read -ra f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Resident memory of a process tree, in KiB (shared pages count once per process).
rss_kib() {
    local total=0 p kib
    for p in $(tree "$1"); do
        kib="$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)"
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

CLK_TCK="$(getconf CLK_TCK)"

# wrk prints latencies as 812.00us / 1.23ms / 2.01s: convert to microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
        else if (v ~ /s$/) print n * 1000000; else print n }'
}

# Runs wrk against a target, prints: req/s p50_us p99_us cpu_percent rss_kib errors.
measure() {
    local target="$1" path="$2" threads="$3" conns="$4" secs="$5" script="${6:-}"
    local out t0 t1 c0 c1
    out="$WORK/wrk-$target.txt"
    c0="$(cpu_ticks "${PID[$target]}")"
    t0="$(date +%s.%N)"
    wrk -t"$threads" -c"$conns" -d"${secs}s" --latency ${script:+-s "$script"} \
        "${URL[$target]}$path" >"$out" 2>&1 ||
        { cat "$out" >&2; die "wrk failed against $target"; }
    t1="$(date +%s.%N)"
    c1="$(cpu_ticks "${PID[$target]}")"
    local rps p50 p99 errors cpu
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    p50="$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")"
    p99="$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")"
    # Non-2xx answers and socket errors both mean the run did not measure what it claims.
    errors="$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(",", ""); n += $4 + $6 + $8 + $10}
        END {print n + 0}' "$out")"
    cpu="$(awk -v a="$c0" -v b="$c1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" \
        'BEGIN {printf "%.0f", (b - a) / hz / (t1 - t0) * 100}')"
    echo "$rps $p50 $p99 $cpu $(rss_kib "${PID[$target]}") $errors"
}

median() {
    tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {
        if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2];
        else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Checks that a proxy answers PATH from its cache (the second of two requests).
expect_hit() {
    local target="$1" path="$2" headers
    curl -s -o /dev/null "${URL[$target]}$path"
    headers="$(curl -s -D - -o /dev/null "${URL[$target]}$path")"
    case "$target" in
        cxgate*) grep -qi '^cache-status: cxgate; hit' <<<"$headers" ;;
        *) grep -qi '^x-cache: HIT' <<<"$headers" ;;
    esac || { echo "$headers" >&2; die "$target does not answer $path from its cache"; }
}

sim_calls() {
    curl -s "http://127.0.0.1:$P_SIM/_sim/stats" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["by_route"].get(sys.argv[1], 0))' \
            "GET $1"
}

cat >"$WORK/burst.py" <<'EOF'
"""N concurrent GETs of one path over N connections opened beforehand, so the burst measures
the proxy and not TCP setup. Prints: p50_ms max_ms count_200 (times from the first send)."""
import asyncio
import sys
import time


async def main(host, port, path, n):
    conns = await asyncio.gather(*[asyncio.open_connection(host, port) for _ in range(n)])
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "Connection: close\r\n\r\n").encode()
    start = time.monotonic()

    async def one(reader, writer):
        writer.write(request)
        await writer.drain()
        answer = await reader.read()  # until the proxy closes: the whole answer is in
        elapsed = time.monotonic() - start
        writer.close()
        return elapsed, answer.split(b" ", 2)[1:2] == [b"200"]

    results = await asyncio.wait_for(asyncio.gather(*[one(r, w) for r, w in conns]), 60)
    times = sorted(t for t, _ in results)
    ok = sum(1 for _, good in results if good)
    print(f"{times[len(times) // 2] * 1000:.1f} {times[-1] * 1000:.1f} {ok}")


asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
EOF

# ---------------------------------------------------------------- runs
for p in "${LOADED[@]}"; do
    expect_hit "$p" /bench/hit
done
for t in "${HIT_TARGETS[@]}"; do
    hitpath=/bench/hit
    [ "$t" = direct ] && hitpath=/bench/direct
    # A short unrecorded run first: pools, caches and CPU frequency settle before round 1.
    measure "$t" "$hitpath" "$THREADS" "$CONNECTIONS" 2 >/dev/null
done
origin_fetches_before="$(wc -l <"$WORK/origin/hit.log")"

declare -A RPS P50 P99 CPU RSS ERR OV50 OV99 OVERR B50 BMAX BCALLS BOK
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS: cache hits, wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s" >&2
    for t in "${HIT_TARGETS[@]}"; do
        hitpath=/bench/hit
        [ "$t" = direct ] && hitpath=/bench/direct
        read -r rps p50 p99 cpu rss err < <(measure "$t" "$hitpath" "$THREADS" "$CONNECTIONS" \
            "$DURATION")
        echo "  $t: $rps req/s, p50 ${p50} us, p99 ${p99} us, cpu ${cpu}%, errors $err" >&2
        RPS[$t]+="$rps "; P50[$t]+="$p50 "; P99[$t]+="$p99 "
        CPU[$t]+="$cpu "; RSS[$t]+="$rss "; ERR[$t]+="$err "
    done
    echo "round $round/$ROUNDS: uncached, wrk -t1 -c1 -d${OVERHEAD_DURATION}s" >&2
    for t in "${TARGETS[@]}"; do
        read -r _ p50 p99 _ _ err < <(measure "$t" /bench/pass 1 1 "$OVERHEAD_DURATION")
        echo "  $t: p50 ${p50} us, p99 ${p99} us, errors $err" >&2
        OV50[$t]+="$p50 "; OV99[$t]+="$p99 "; OVERR[$t]+="$err "
    done
    echo "round $round/$ROUNDS: cold burst, $BURST concurrent reads of one new key" >&2
    for p in "${PROXIES[@]}"; do
        path="/12345/inbox/contact/twitter/cold-$p-$round-$RANDOM"
        read -r b50 bmax bok < <(python3 "$WORK/burst.py" 127.0.0.1 "${URL[$p]##*:}" "$path" \
            "$BURST")
        calls="$(sim_calls "$path")"
        echo "  $p: upstream calls $calls, p50 $b50 ms, max $bmax ms, 200s $bok/$BURST" >&2
        B50[$p]+="$b50 "; BMAX[$p]+="$bmax "; BCALLS[$p]+="$calls "; BOK[$p]+="$bok "
    done
done
origin_fetches=$(($(wc -l <"$WORK/origin/hit.log") - origin_fetches_before))

# ---------------------------------------------------------------- table
M_RPS_DIRECT="$(median <<<"${RPS[direct]}")"
M_OV_DIRECT="$(median <<<"${OV50[direct]}")"

echo
echo "cxgate compare: $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "$(nginx -v 2>&1 | sed 's/.*: //')," \
    "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $("$BIN" --version)"
echo "body $BODY_BYTES B JSON; medians of $ROUNDS rounds, targets in alternation"
echo
echo "cache hits: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s (CPU: % of one core; RSS of the process tree)"
printf '%-26s %9s %9s %9s %6s %8s %8s %8s %6s\n' target "req/s" "p50 us" "p99 us" "CPU%" \
    "RSS MiB" "x nginx" "x direct" errors
for t in "${HIT_TARGETS[@]}"; do
    rps="$(median <<<"${RPS[$t]}")"
    printf '%-26s %9.0f %9.0f %9.0f %6.0f %8.1f %8.2f %8.2f %6s\n' "${LABEL[$t]}" "$rps" \
        "$(median <<<"${P50[$t]}")" "$(median <<<"${P99[$t]}")" "$(median <<<"${CPU[$t]}")" \
        "$(awk -v k="$(median <<<"${RSS[$t]}")" 'BEGIN {print k / 1024}')" \
        "$(awk -v a="$rps" -v b="$(median <<<"${RPS[${REF[$t]}]}")" 'BEGIN {print a / b}')" \
        "$(awk -v a="$rps" -v b="$M_RPS_DIRECT" 'BEGIN {print a / b}')" \
        "$(tr ' ' '\n' <<<"${ERR[$t]}" | awk '{n += $1} END {print n + 0}')"
done
echo "origin fetches of the hit key during the timed runs: $origin_fetches (0 = all were hits)"
echo
echo "uncached (GET forwarded every time): wrk -t1 -c1 -d${OVERHEAD_DURATION}s, sequential"
printf '%-26s %9s %9s %12s %6s\n' target "p50 us" "p99 us" "added p50 us" errors
for t in "${TARGETS[@]}"; do
    p50="$(median <<<"${OV50[$t]}")"
    printf '%-26s %9.0f %9.0f %12.0f %6s\n' "${LABEL[$t]}" "$p50" "$(median <<<"${OV99[$t]}")" \
        "$(awk -v a="$p50" -v b="$M_OV_DIRECT" 'BEGIN {print a - b}')" \
        "$(tr ' ' '\n' <<<"${OVERR[$t]}" | awk '{n += $1} END {print n + 0}')"
done
echo
echo "cold burst: $BURST concurrent reads of one new key, upstream latency 100 ms"
printf '%-26s %16s %9s %9s %12s %9s\n' proxy "upstream calls" "p50 ms" "max ms" "worst max" "200s"
for p in "${PROXIES[@]}"; do
    printf '%-26s %16s %9.1f %9.1f %12.1f %9s\n' "${LABEL[$p]}" \
        "$(tr ' ' ',' <<<"${BCALLS[$p]% }")" "$(median <<<"${B50[$p]}")" \
        "$(median <<<"${BMAX[$p]}")" \
        "$(tr ' ' '\n' <<<"${BMAX[$p]}" | sort -g | tail -1)" \
        "$(tr ' ' '\n' <<<"${BOK[$p]}" | awk '{n += $1} END {print n + 0}')/$((BURST * ROUNDS))"
done

# ---------------------------------------------------------------- scenario sweep
[ "$SCENARIOS" = 1 ] || exit 0

# Random keys: each wrk thread seeds its own generator, so threads read different keys.
cat >"$WORK/keys.lua" <<EOF
local n = $KEYS
local threads = 0
setup = function(thread)
    thread:set("seed", threads)
    threads = threads + 1
end
init = function(args)
    math.randomseed(os.time() * 1000 + seed)
end
request = function()
    return wrk.format("GET", "/12345/inbox/contact/bench/k" .. math.random(0, n - 1))
end
EOF

# Fetches every key once over a few keep-alive connections; prints how many answered 200.
cat >"$WORK/warm.py" <<'EOF'
import http.client
import sys
import threading

port, n, workers = int(sys.argv[1]), int(sys.argv[2]), 4
ok = [0] * workers


def run(w):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for k in range(w, n, workers):
        conn.request("GET", f"/12345/inbox/contact/bench/k{k}")
        resp = conn.getresponse()
        resp.read()
        ok[w] += resp.status == 200


threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sum(ok))
EOF

for p in "${LOADED[@]}"; do
    warmed="$(python3 "$WORK/warm.py" "${URL[$p]##*:}" "$KEYS")"
    [ "$warmed" = "$KEYS" ] || die "$p answered $warmed of $KEYS keys with 200 while warming"
    expect_hit "$p" "/12345/inbox/contact/bench/k$((KEYS - 1))"
    expect_hit "$p" /bench/big
done

SCENS=()
declare -A S_PATH S_CONNS S_SCRIPT S_LABEL
for c in $SWEEP; do
    SCENS+=("hot$c"); S_PATH[hot$c]=/bench/hit; S_CONNS[hot$c]=$c; S_SCRIPT[hot$c]=""
    S_LABEL[hot$c]="one hot key, $c connections"
done
SCENS+=(keys); S_PATH[keys]=/; S_CONNS[keys]=$CONNECTIONS; S_SCRIPT[keys]="$WORK/keys.lua"
S_LABEL[keys]="$KEYS keys at random, $CONNECTIONS conns"
SCENS+=(big); S_PATH[big]=/bench/big; S_CONNS[big]=$CONNECTIONS; S_SCRIPT[big]=""
S_LABEL[big]="$((BIG_BYTES / 1024)) KB body, $CONNECTIONS connections"

declare -A SR SP99 SE
for round in $(seq "$ROUNDS"); do
    for sc in "${SCENS[@]}"; do
        echo "round $round/$ROUNDS: ${S_LABEL[$sc]}, wrk -t$THREADS -d${DURATION}s" >&2
        for t in "${LOADED[@]}"; do
            read -r rps _ p99 _ _ err < <(measure "$t" "${S_PATH[$sc]}" "$THREADS" \
                "${S_CONNS[$sc]}" "$DURATION" "${S_SCRIPT[$sc]}")
            echo "  $t: $rps req/s, p99 ${p99} us, errors $err" >&2
            SR[$sc|$t]+="$rps "; SP99[$sc|$t]+="$p99 "; SE[$sc|$t]+="$err "
        done
    done
done

# Per-round ratios of two space-separated lists, in round order: "1.31,1.28,1.35".
ratios() {
    paste -d' ' <(tr ' ' '\n' <<<"$1" | grep -v '^$') <(tr ' ' '\n' <<<"$2" | grep -v '^$') |
        awk '{printf "%s%.2f", (NR > 1 ? "," : ""), $1 / $2}'
}

# One table: cxgate against nginx, the two logging alike.
pair_table() {
    local title="$1" cx="$2" ng="$3" sc a b
    echo
    echo "$title: req/s medians of $ROUNDS rounds, wrk -t$THREADS -d${DURATION}s"
    printf '%-36s %9s %9s %6s %-18s %9s %9s %6s\n' scenario cxgate nginx ratio "per round" \
        "cx p99us" "ng p99us" errors
    for sc in "${SCENS[@]}"; do
        a="$(median <<<"${SR[$sc|$cx]}")"; b="$(median <<<"${SR[$sc|$ng]}")"
        printf '%-36s %9.0f %9.0f %6.2f %-18s %9.0f %9.0f %6s\n' "${S_LABEL[$sc]}" "$a" "$b" \
            "$(awk -v a="$a" -v b="$b" 'BEGIN {print a / b}')" \
            "$(ratios "${SR[$sc|$cx]}" "${SR[$sc|$ng]}")" \
            "$(median <<<"${SP99[$sc|$cx]}")" "$(median <<<"${SP99[$sc|$ng]}")" \
            "$(tr ' ' '\n' <<<"${SE[$sc|$cx]} ${SE[$sc|$ng]}" | awk '{n += $1} END {print n + 0}')"
    done
}
pair_table "scenarios, no access logs" cxgate nginx
if [ "$LOGS" = 1 ]; then
    pair_table "scenarios, both logging every request to a file" cxgate_log nginx_log
    echo "access log lines: cxgate $(wc -l <"$WORK/cxgatelog/access.log")," \
        "nginx $(wc -l <"$WORK/nginxlog/access.log");" \
        "cxgate dropped $(curl -s "http://127.0.0.1:$P_ADMINLOG/metrics" |
            awk '$1 == "cxgate_access_log_dropped_total" {print $2}')"
fi
if [ "$VARNISH" = 1 ]; then
    echo
    echo "varnish in the same runs (req/s, ratio to nginx):"
    for sc in "${SCENS[@]}"; do
        a="$(median <<<"${SR[$sc|varnish]}")"; b="$(median <<<"${SR[$sc|nginx]}")"
        printf '%-36s %9.0f %6.2f\n' "${S_LABEL[$sc]}" "$a" \
            "$(awk -v a="$a" -v b="$b" 'BEGIN {print a / b}')"
    done
fi
