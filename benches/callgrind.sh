#!/usr/bin/env bash
# Instructions per cache hit as connections grow, counted by callgrind: numbers that do not
# move with whatever else the machine runs, unlike req/s.
#
# It starts an origin (nginx `return 200` with a 1.5 KB JSON body) and the release cxgate
# under `valgrind --tool=callgrind`, caches the one hot key with a warm-up request, then for
# each connection count runs `wrk -t2 -cN -dD` against it. Each wrk run is cut into three
# callgrind dumps: the connect phase (until every connection is open, at most --ramp
# seconds), the steady window (until --tail seconds before wrk ends) and the teardown (the
# rest, plus the connections closing). The
# gateway's own `cxgate_requests_total` is scraped at the cuts, so the steady window is
# counted in requests the gateway answered in it, and the whole run in requests wrk
# completed. Prints one line per connection count and leaves the dumps for
# `callgrind_annotate` in --out.
#
# --log text|json has the gateway write its access log to a file (one line per request, as
# `server.access_log = "<file>"` with `--log-format text|json`), so the same run with and
# without it gives the log's Ir per request. --path picks what wrk asks for: `hit` (the
# cached 1.5 KB key), `big` (a cached 64 KB body) or `pass` (no route: forwarded upstream
# every time; use it with --conns 1 and `wrk -t1`, the sequential uncached case).
#
# With --rss it runs the binary natively instead and reports resident memory per idle
# connection: N connections that each asked once for the hit and stay open.
#
# With --strace it runs the binary natively under `strace -f -c` instead: one wrk run of
# --duration seconds per connection count (use one count), then the system calls per
# request wrk completed, by call, from strace's summary (kept in --out as strace.txt).
#
# With --perf it runs the binary natively and counts, with `perf stat -p` over the steady
# window of each wrk run (after every connection is open, until --tail seconds before the
# end), per request the gateway answered in it: system calls (all, and epoll_wait, recvfrom,
# writev, accept4, epoll_ctl, futex, write), context switches, CPU migrations and CPU time; and over
# the whole run the kernel's listen queue overflows (TcpExtListenOverflows, system-wide).
# Needs `perf` with the syscall tracepoints (Debian's linux-perf, as root).
#
# With --nginx (with --perf or --strace only) the same counts are made of an nginx
# proxy_cache in front of the same origin instead of cxgate: compare.sh's caching nginx
# (`worker_processes auto`, `access_log` off, or to a file with --log text), its requests
# counted by `stub_status`, its workers' system calls by `perf stat` over the master and
# workers. The bar cxgate's own counts are read against.
#
# Usage: benches/callgrind.sh [--duration SECONDS] [--ramp SECONDS] [--tail SECONDS]
#                             [--conns "32 512 4096"] [--out DIR] [--rss]
#                             [--log off|text|json] [--path hit|big|pass] [--strace]
#                             [--perf] [--nginx]
# Needs valgrind, nginx, wrk, curl, python3. CXGATE_BIN names the binary (default
# target/release/cxgate; build it with `cargo build --release` first).
set -euo pipefail

DURATION=45
RAMP=20
TAIL=3
CONNS="32 512 4096"
OUT=""
RSS=0
STRACE=0
PERF=0
NGINX=0
LOG=off
WHAT=hit
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --ramp) RAMP="$2"; shift 2 ;;
        --tail) TAIL="$2"; shift 2 ;;
        --conns) CONNS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --rss) RSS=1; shift ;;
        --strace) STRACE=1; shift ;;
        --perf) PERF=1; shift ;;
        --nginx) NGINX=1; shift ;;
        --log) LOG="$2"; shift 2 ;;
        --path) WHAT="$2"; shift 2 ;;
        -h|--help) sed -n '/^# Usage:/,/^# target/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "callgrind.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$LOG" in off | text | json) ;; *) echo "callgrind.sh: --log is off, text or json" >&2; exit 2 ;; esac
case "$WHAT" in hit | big | pass) ;; *) echo "callgrind.sh: --path is hit, big or pass" >&2; exit 2 ;; esac
[ "$NGINX" = 0 ] || [ "$PERF" = 1 ] || [ "$STRACE" = 1 ] ||
    { echo "callgrind.sh: --nginx goes with --perf or --strace" >&2; exit 2; }
[ "$DURATION" -gt $((RAMP + TAIL)) ] || { echo "callgrind.sh: --duration must exceed ramp + tail" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${CXGATE_BIN:-$ROOT/target/release/cxgate}"
[ -x "$BIN" ] || { echo "callgrind.sh: no cxgate binary at $BIN" >&2; exit 2; }
for tool in valgrind callgrind_control nginx wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool not found" >&2; exit 2; }
done
# 4,096 connections need that many descriptors in wrk and in the gateway.
ulimit -n "$(ulimit -Hn)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cxgate-callgrind.XXXXXX")"
OUT="${OUT:-$WORK/out}"
mkdir -p "$OUT" "$WORK/origin/static/bench"
PIDS=()
cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "${PIDS[i]}" 2>/dev/null || true
        wait "${PIDS[i]}" 2>/dev/null || true
    done
    rm -rf "$WORK/origin" "$WORK/cxgate.toml" "$WORK/access.log"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r P_ORIGIN P_CX P_ADMIN < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)
BODY="$(python3 - <<'EOF'
import json
doc = {"meta": {"code": 200}, "response": {"id": 1, "name": "Compare harness", "bio": ""}}
doc["response"]["bio"] = "x" * (1536 - len(json.dumps(doc, separators=(",", ":"))))
print(json.dumps(doc, separators=(",", ":")), end="")
EOF
)"
# The large body (--path big): 64 KB, the same envelope, served from a file.
python3 - >"$WORK/origin/static/bench/big" <<'EOF'
import json
doc = {"meta": {"code": 200}, "response": {"id": 2, "name": "Compare harness", "bio": ""}}
doc["response"]["bio"] = "y" * (65536 - len(json.dumps(doc, separators=(",", ":"))))
print(json.dumps(doc, separators=(",", ":")), end="")
EOF
NGINX_USER=""
[ "$(id -u)" = 0 ] && NGINX_USER="user root;"
cat >"$WORK/origin/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
error_log $WORK/origin/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/origin/body;
    proxy_temp_path $WORK/origin/proxy;
    fastcgi_temp_path $WORK/origin/fastcgi;
    uwsgi_temp_path $WORK/origin/uwsgi;
    scgi_temp_path $WORK/origin/scgi;
    default_type application/json;
    server {
        listen 127.0.0.1:$P_ORIGIN;
        location = /bench/hit { return 200 '$BODY'; }
        location = /bench/pass { return 200 '$BODY'; }
        location = /bench/big { root $WORK/origin/static; }
    }
}
EOF
ACCESS_LOG=off
LOG_FORMAT=text
[ "$LOG" != off ] && ACCESS_LOG="$WORK/access.log" && LOG_FORMAT="$LOG"
# The same gateway config as benches/compare.sh (no access log unless --log, a budget no
# run reaches),
# but for header_timeout: under valgrind the gateway is some 50 times slower, and at 4,096
# connections a connection can wait more than the default 10 s from accept to its first
# read; closed, it would come back as a reconnect and measure accepts instead of hits.
cat >"$WORK/cxgate.toml" <<EOF
[server]
listen = "127.0.0.1:$P_CX"
admin_listen = "127.0.0.1:$P_ADMIN"
max_concurrency = 8192
access_log = "$ACCESS_LOG"
header_timeout = "60s"

[upstream]
base_url = "http://127.0.0.1:$P_ORIGIN"

[token]
access_token_env = "CXGATE_CALLGRIND_TOKEN"

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
EOF

nginx -p "$WORK/origin" -c "$WORK/origin/nginx.conf" -g "daemon off; pid $WORK/origin/nginx.pid;" \
    >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
# CALLGRIND_ARGS adds valgrind options, e.g. "--cache-sim=yes" for cache misses per request.
read -ra EXTRA <<<"${CALLGRIND_ARGS:-}"
RUNNER=(valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" "${EXTRA[@]}")
[ "$RSS" = 1 ] && RUNNER=()
[ "$STRACE" = 1 ] && RUNNER=(strace -f -c -o "$OUT/strace.txt")
[ "$PERF" = 1 ] && RUNNER=()
if [ "$NGINX" = 1 ]; then
    # compare.sh's caching nginx, with `stub_status` on the admin port for the request count.
    mkdir -p "$WORK/nginx/cache"
    NGINX_LOG=off
    [ "$LOG" != off ] && NGINX_LOG="$WORK/access.log"
    cat >"$WORK/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes auto;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
worker_rlimit_nofile 20000;
http {
    access_log $NGINX_LOG;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 100000000;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=bench:16m max_size=256m
                     inactive=2h use_temp_path=off;
    upstream origin {
        server 127.0.0.1:$P_ORIGIN;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$P_ADMIN;
        access_log off;
        location = /status { stub_status; }
    }
    server {
        listen 127.0.0.1:$P_CX;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Authorization "Bearer callgrind-token";
        location = /bench/pass { proxy_pass http://origin; }
        location / {
            proxy_pass http://origin;
            proxy_cache bench;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie Vary X-Accel-Expires;
            add_header X-Cache \$upstream_cache_status;
        }
    }
}
EOF
    "${RUNNER[@]}" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" \
        -g "daemon off; pid $WORK/nginx/nginx.pid;" >"$WORK/cxgate.log" 2>&1 &
    PIDS+=($!); CX=$!
    HEALTH="http://127.0.0.1:$P_ADMIN/status"
else
    CXGATE_CALLGRIND_TOKEN=callgrind-token "${RUNNER[@]}" "$BIN" --log-level warn --log-format "$LOG_FORMAT" run \
        --config "$WORK/cxgate.toml" >"$WORK/cxgate.log" 2>&1 &
    PIDS+=($!); CX=$!
    HEALTH="http://127.0.0.1:$P_ADMIN/healthz"
fi
for _ in $(seq 600); do
    curl -s -o /dev/null "$HEALTH" && break
    kill -0 "$CX" 2>/dev/null || { cat "$WORK/cxgate.log" >&2; exit 1; }
    sleep 0.2
done
# Warm-up: the first request fills the cache, the second must be a hit (or, for `pass`, a
# forward).
URL="http://127.0.0.1:$P_CX/bench/$WHAT"
EXPECT='^cache-status: cxgate; hit'
[ "$WHAT" = pass ] && EXPECT='^cache-status: cxgate; fwd='
[ "$NGINX" = 1 ] && EXPECT='^x-cache: hit'
[ "$NGINX" = 1 ] && [ "$WHAT" = pass ] && EXPECT='^HTTP/1.1 200'
curl -s -o /dev/null "$URL"
curl -s -D - -o /dev/null "$URL" | grep -qi "$EXPECT" ||
    { echo "callgrind.sh: the warm-up request was not what --path $WHAT expects" >&2; exit 1; }

served() {
    if [ "$NGINX" = 1 ]; then
        # stub_status: the third number of its third line is requests; less this one.
        curl -s "$HEALTH" | awk 'NR == 3 {printf "%d\n", $3 - 1}'
        return
    fi
    curl -s "http://127.0.0.1:$P_ADMIN/metrics" |
        awk '/^cxgate_requests_total\{/ {n += $NF} END {printf "%d\n", n}'
}
open_conns() {
    if [ "$NGINX" = 1 ]; then
        curl -s "$HEALTH" | awk '/^Active connections:/ {printf "%d\n", $3 - 1}'
        return
    fi
    curl -s "http://127.0.0.1:$P_ADMIN/metrics" |
        awk '/^cxgate_connections_open\{listener="client"\}/ {printf "%d\n", $NF}'
}
# Dumps the counters since the last zero or dump as part $1 and prints its total Ir.
dump() {
    callgrind_control -d "$1" "$CX" >/dev/null 2>&1
    local f
    f="$(ls -t "$OUT"/callgrind.out.* | head -1)"
    mv "$f" "$OUT/$1.out"
    awk '/^(summary|totals):/ {print $2; exit}' "$OUT/$1.out"
}

if [ "$RSS" = 1 ]; then
    # Resident memory per open connection, from outside, on the binary run natively: each
    # connection asks once for the hit and then stays open, idle, while VmRSS is read.
    cat >"$WORK/idle.py" <<'EOF'
import asyncio, sys
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
REQ = b"GET /bench/hit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
def rss():
    return next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
async def one(gate):
    async with gate:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(REQ)
        head = await r.readuntil(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length:"))
        await r.readexactly(length)
        return w
async def main():
    before = rss()
    gate = asyncio.Semaphore(256)
    writers = await asyncio.gather(*[one(gate) for _ in range(n)])
    await asyncio.sleep(1)
    print(before, rss())
    for w in writers:
        w.close()
    await asyncio.sleep(2)
asyncio.run(main())
EOF
    echo "conns  rss_before_kib  rss_open_kib  bytes_per_connection"
    for n in $CONNS; do
        read -r before open < <(python3 "$WORK/idle.py" "$P_CX" "$n" "$CX")
        awk -v n="$n" -v b="$before" -v o="$open" \
            'BEGIN {printf "%5d  %14d  %12d  %20.0f\n", n, b, o, (o - b) * 1024 / n}'
    done
    exit 0
fi

if [ "$STRACE" = 1 ]; then
    total=0
    for n in $CONNS; do
        wrk -t"$((n < 2 ? 1 : 2))" -c"$n" -d"${DURATION}s" --timeout 60s "$URL" >"$OUT/wrk-$n.txt" 2>&1
        reqs="$(awk '/requests in/ {print $1}' "$OUT/wrk-$n.txt")"
        echo "$n connections: $reqs requests in ${DURATION}s under strace"
        total=$((total + reqs))
    done
    # strace writes its summary once the gateway (its child) has exited.
    kill -TERM "$(ps -o pid= --ppid "$CX")" 2>/dev/null || true
    wait "$CX" 2>/dev/null || true
    total=$((total + 2))  # the two warm-up requests
    echo "syscall  calls  per_request"
    awk -v r="$total" '$1 ~ /^[0-9.]+$/ && $NF != "total" {
        printf "%-16s %9d %8.2f\n", $NF, $4, $4 / r }' \
        "$OUT/strace.txt" | sort -k2 -nr | head -15
    exit 0
fi

if [ "$PERF" = 1 ]; then
    command -v perf >/dev/null || { echo "callgrind.sh: perf not found" >&2; exit 2; }
    EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom
    EVENTS=$EVENTS,syscalls:sys_enter_writev,syscalls:sys_enter_accept4
    EVENTS=$EVENTS,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_futex,syscalls:sys_enter_write
    EVENTS=$EVENTS,context-switches,cpu-migrations,task-clock
    overflows() { awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) col[$i] = i; h = 1 }
        else print $col["ListenOverflows"] }' /proc/net/netstat; }
    # nginx: the master and its workers.
    TARGET="$CX"
    [ "$NGINX" = 1 ] && TARGET="$(echo "$CX" $(ps -o pid= --ppid "$CX") | tr -s ' ' ',')"
    echo "conns  steady_requests  req/s  syscalls  epoll_wait  recvfrom  writev  accept4  epoll_ctl  futex  write  ctx_switches  migrations  cpu_us  listen_overflows  wrk_errors"
    for n in $CONNS; do
        o0="$(overflows)"
        wrk -t"$((n < 2 ? 1 : 2))" -c"$n" -d"${DURATION}s" --timeout 60s "$URL" \
            >"$OUT/wrk-$n.txt" 2>&1 &
        WRK=$!
        ramp_end=$((SECONDS + RAMP))
        sleep 1
        while [ "$SECONDS" -lt "$ramp_end" ] && [ "$(open_conns)" -lt "$n" ]; do sleep 0.2; done
        window=$((DURATION - (SECONDS - ramp_end + RAMP) - TAIL))
        s0="$(served)"
        if [ -n "${PERF_RECORD:-}" ]; then
            # PERF_RECORD=1: a cpu-clock profile of the same window as well, for `perf report
            # -i $OUT/perf-$n.data --sort dso,sym` (samples at 1 kHz, so ms of CPU).
            perf record -q -F 1000 -e cpu-clock -p "$TARGET" -o "$OUT/perf-$n.data" -- sleep "$window" 2>/dev/null &
            REC=$!
        fi
        perf stat -x, -e "$EVENTS" -p "$TARGET" -o "$OUT/perf-$n.txt" -- sleep "$window"
        [ -n "${REC:-}" ] && { wait "$REC" || true; }
        s1="$(served)"
        wait "$WRK"
        sleep 2
        o1="$(overflows)"
        errors="$(awk '/Non-2xx/ {e += $NF} /Socket errors/ {gsub(",", ""); e += $4 + $6 + $8 + $10}
            END {print e + 0}' "$OUT/wrk-$n.txt")"
        awk -F, -v n="$n" -v r="$((s1 - s0))" -v w="$window" -v o="$((o1 - o0))" -v e="$errors" '
            $3 ~ /sys_enter$/ { v["all"] = $1 } $3 ~ /epoll_wait/ { v["ew"] = $1 }
            $3 ~ /recvfrom/ { v["rf"] = $1 } $3 ~ /writev/ { v["wv"] = $1 }
            $3 ~ /accept4/ { v["ac"] = $1 } $3 ~ /epoll_ctl/ { v["ec"] = $1 }
            $3 ~ /futex/ { v["fx"] = $1 } $3 ~ /sys_enter_write$/ { v["wr"] = $1 }
            $3 == "context-switches" { v["cs"] = $1 }
            $3 == "cpu-migrations" { v["mg"] = $1 } $3 == "task-clock" { v["tc"] = $1 }
            END { printf "%5d  %15d  %5.0f  %8.3f  %10.3f  %8.3f  %6.3f  %7.4f  %9.4f  %5.3f  %5.3f  %12.4f  %10.4f  %6.2f  %16d  %10d\n",
                n, r, r / w, v["all"] / r, v["ew"] / r, v["rf"] / r, v["wv"] / r, v["ac"] / r,
                v["ec"] / r, v["fx"] / r, v["wr"] / r, v["cs"] / r, v["mg"] / r, v["tc"] * 1000 / r, o, e }' \
            "$OUT/perf-$n.txt"
    done
    exit 0
fi

echo "conns  ramp_s  wrk_requests  wrk_req/s  Ir_total  Ir/req(whole)  steady_requests  Ir/req(steady)  errors"
for n in $CONNS; do
    callgrind_control -z "$CX" >/dev/null 2>&1
    wrk -t"$((n < 2 ? 1 : 2))" -c"$n" -d"${DURATION}s" --timeout 60s "$URL" \
        >"$OUT/wrk-$n.txt" 2>&1 &
    WRK=$!
    # The connect phase ends when every connection is open (the listen queue overflows at
    # 4,096 under valgrind, and the kernel's SYN retries spread the connects over seconds),
    # or after --ramp seconds at most.
    ramp_end=$((SECONDS + RAMP))
    sleep 1
    while [ "$SECONDS" -lt "$ramp_end" ] && [ "$(open_conns)" -lt "$n" ]; do sleep 0.5; done
    ramp_took=$((SECONDS - ramp_end + RAMP))
    ir_ramp="$(dump "c$n-ramp")"
    s0="$(served)"
    sleep $((DURATION - ramp_took - TAIL))
    ir_steady="$(dump "c$n-steady")"
    s1="$(served)"
    wait "$WRK"
    sleep 3  # the connections close
    ir_tail="$(dump "c$n-tail")"
    reqs="$(awk '/requests in/ {print $1}' "$OUT/wrk-$n.txt")"
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$OUT/wrk-$n.txt")"
    errors="$(awk '/Non-2xx/ {e += $NF} /Socket errors/ {gsub(",", ""); e += $4 + $6 + $8 + $10}
        END {print e + 0}' "$OUT/wrk-$n.txt")"
    awk -v n="$n" -v ramp="$ramp_took" -v reqs="$reqs" -v rps="$rps" -v a="$ir_ramp" \
        -v b="$ir_steady" -v c="$ir_tail" -v s="$((s1 - s0))" -v e="$errors" 'BEGIN {
        printf "%5d  %6d  %12d  %9s  %8.3g  %13.0f  %15d  %14.0f  %6d\n",
            n, ramp, reqs, rps, a + b + c, (a + b + c) / reqs, s, b / s, e }'
done
[ "$LOG" != off ] && echo "access log lines: $(wc -l <"$WORK/access.log")" >&2
echo "dumps: $OUT (callgrind_annotate $OUT/c<N>-steady.out)" >&2
