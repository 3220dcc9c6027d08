#!/usr/bin/env bash
# Runs the whole comparison: amqp-client's perf tool, lapin and amqprs, on
# the same workloads, against perf's sink/flood peers and a real broker, and
# prints a table. Raw logs go to $OUT.
#
#   bench-compare/run.sh                      # everything, 2 runs of 10 s each
#   RUNS=1 DURATION=5 bench-compare/run.sh    # quicker
#   TARGETS=peer bench-compare/run.sh         # peers only (no broker needed)
#
# Environment:
#   PERF      perf binary (default: <repo>/target/release/examples/perf)
#   RUNS      runs per measurement (2)       DURATION  seconds per run (10)
#   SIZE      body bytes (32)                BROKER    broker URL
#   TARGETS   "peer broker" (default both)   CLIENTS   "ours lapin amqprs"
#   PREFILL   if set (e.g. 2000000): also a consume run against the broker on
#             a queue pre-filled with that many messages (confirm mode, not
#             counted), for lapin, amqprs and, as perf purges its queue first,
#             bench-ours (amqp-client in this crate's harness, --features ours)
#   OUT       log folder (default: bench-compare/target/results/<time>)
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PERF="${PERF:-$ROOT/target/release/examples/perf}"
RUNS="${RUNS:-2}"
DURATION="${DURATION:-10}"
SIZE="${SIZE:-32}"
BROKER="${BROKER:-amqp://guest:guest@127.0.0.1:5672/%2f}"
TARGETS="${TARGETS:-peer broker}"
CLIENTS="${CLIENTS:-ours lapin amqprs}"
PREFILL="${PREFILL:-}"
OUT="${OUT:-$HERE/target/results/$(date +%Y%m%d-%H%M%S)}"
BIN="$HERE/target/release"
QUEUE=amqp-client.perf
mkdir -p "$OUT"

if [ ! -x "$PERF" ]; then
    echo "building perf" >&2
    (cd "$ROOT" && cargo build --release -p amqp091 --example perf) || exit 1
fi
if [ ! -x "$BIN/bench-lapin" ] || [ ! -x "$BIN/bench-amqprs" ]; then
    echo "building bench-compare" >&2
    # bench-ours (amqp-client through the same harness) is optional: an API
    # change in amqp-client must not stop the comparison.
    (cd "$HERE" && { cargo build --release --features ours || cargo build --release; }) || exit 1
fi

RESULTS="$OUT/results.tsv"
printf 'target\tworkload\tclient\trun\tmsgs_per_s\tcpu_us_per_msg\tpeak_rss_mib\tpublished\tconsumed\tbroker_enqueued\tnote\n' >"$RESULTS"

free_port() {
    local p
    for p in $(seq 47100 47999); do
        if ! ss -ltn 2>/dev/null | grep -q ":$p "; then echo "$p"; return; fi
    done
}

start_peer() { # kind -> sets PEER_PID, PEER_URL
    local port
    port="$(free_port)"
    "$PERF" serve "$1" "$port" "$SIZE" 2>>"$OUT/peer.log" &
    PEER_PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
    done
    PEER_URL="amqp://guest:guest@127.0.0.1:$port/%2f"
}

stop_peer() {
    kill "$PEER_PID" 2>/dev/null
    wait "$PEER_PID" 2>/dev/null
}

queue_depth() {
    if command -v rabbitmqctl >/dev/null; then
        rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$QUEUE" '$1 == q { print $2 }'
    fi
}

# parse LOG WORKLOAD -> "msgs_per_s cpu rss published consumed"
parse() {
    local log="$1" workload="$2"
    if grep -q '^RESULT ' "$log"; then
        local line
        line="$(grep '^RESULT ' "$log" | tail -1)"
        local v k
        for k in msgs_per_s cpu_us_per_msg peak_rss_mib published consumed; do
            v="$(sed -n "s/.* $k=\([^ ]*\).*/\1/p" <<<"$line")"
            printf '%s ' "${v:--}"
        done
        echo
    else # perf's own output
        local pub_n pub_r con_n con_r cpu rss rate
        pub_n="$(sed -n 's/^ *published \([0-9]*\) (\([0-9]*\) msg\/s).*/\1/p' "$log")"
        pub_r="$(sed -n 's/^ *published \([0-9]*\) (\([0-9]*\) msg\/s).*/\2/p' "$log")"
        con_n="$(sed -n 's/^ *consumed *\([0-9]*\) (\([0-9]*\) msg\/s).*/\1/p' "$log")"
        con_r="$(sed -n 's/^ *consumed *\([0-9]*\) (\([0-9]*\) msg\/s).*/\2/p' "$log")"
        cpu="$(sed -n 's/.*= \([0-9.]*\) µs per message.*/\1/p' "$log")"
        rss="$(sed -n 's/^ *peak RSS \([0-9.]*\) MiB.*/\1/p' "$log")"
        if [ "$workload" = consume ]; then rate="$con_r"; else rate="$pub_r"; fi
        echo "${rate:--} ${cpu:--} ${rss:--} ${pub_n:--} ${con_n:--}"
    fi
}

# The arguments as one line with every URL's password masked, fit for logs.
without_passwords() {
    sed -E 's#(amqps?://[^:/@ ]*:)[^@ ]*@#\1***@#g' <<<"$*"
}

# measure TARGET WORKLOAD CLIENT RUN URL NOTE -- command...
measure() {
    local target="$1" workload="$2" client="$3" run="$4" note="$5"
    shift 6
    local log="$OUT/$target-$workload-$client-$run.log"
    # Measure on a quiet machine: wait for anybody's build to end.
    while pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null; do
        echo "waiting for a running cargo/rustc to finish before measuring..." >&2
        sleep 10
    done
    echo "== $target $workload $client run $run (load $(cut -d' ' -f1 /proc/loadavg)): $(without_passwords "$@")" | tee "$log" >&2
    timeout $((DURATION + 300)) "$@" >>"$log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && note="${note:+$note; }exit $rc"
    grep -q FAILURE "$log" && note="${note:+$note; }$(grep -m1 FAILURE "$log" | sed 's/^ *//')"
    local enq="-"
    if [ "$target" = broker ] && { [ "$workload" = publish ] || [ "$workload" = confirm ]; }; then
        sleep 1
        enq="$(queue_depth)"
        enq="${enq:--}"
    fi
    read -r rate cpu rss pub con <<<"$(parse "$log" "$workload")"
    if [ "$workload" = consume-prefilled ] && [ "$con" = "$PREFILL" ]; then
        note="$note; queue drained before the end: rate is a lower bound"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$target" "$workload" "$client" "$run" "$rate" "$cpu" "$rss" "$pub" "$con" "$enq" "$note" >>"$RESULTS"
    grep -E '^ *(published|consumed|client CPU|peak RSS)' "$log" | sed 's/^/    /' >&2
    sleep 2
}

client_cmd() { # client workload url|sink|flood [feed] -> sets CMD
    local client="$1" workload="$2" url="$3" feed="${4:-}"
    case "$client" in
    ours)
        local peer_args=()
        case "$workload" in
        publish) peer_args=(--producers 1) ;;
        confirm) peer_args=(--producers 1 --confirm 1000) ;;
        consume)
            if [ "$feed" = none ]; then peer_args=(--prefetch 1000)
            else peer_args=(--producers 1 --consumers 1 --prefetch 1000); fi ;;
        esac
        if [ "$url" = sink ] || [ "$url" = flood ]; then
            # perf starts its own peer process (not counted), as documented.
            CMD=("$PERF" --peer "$url" "${peer_args[@]}" --size "$SIZE" --duration "$DURATION")
        else
            CMD=("$PERF" --url "$url" "${peer_args[@]}" --size "$SIZE" --duration "$DURATION")
        fi
        ;;
    lapin | amqprs)
        CMD=("$BIN/bench-$client" --url "$url" --workload "$workload" --duration "$DURATION" --size "$SIZE")
        [ -n "$feed" ] && CMD+=(--feed "$feed")
        ;;
    esac
}

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); perf: $PERF ($(sha256sum "$PERF" | cut -c1-12))" | tee "$OUT/machine.txt" >&2
for v in lapin amqprs; do
    sed -n "/^name = \"$v\"/{n;p}" "$HERE/Cargo.lock" | sed "s/^/$v /" | tee -a "$OUT/machine.txt" >&2
done

for target in $TARGETS; do
    for workload in publish confirm consume; do
        for client in $CLIENTS; do
            for run in $(seq "$RUNS"); do
                if [ "$target" = peer ]; then
                    kind=sink feed=""
                    [ "$workload" = consume ] && kind=flood feed=none
                    if [ "$client" = ours ]; then
                        client_cmd ours "$workload" "$kind" "$feed"
                        measure peer "$workload" ours "$run" "perf --peer $kind" -- "${CMD[@]}"
                    else
                        start_peer "$kind"
                        client_cmd "$client" "$workload" "$PEER_URL" "$feed"
                        measure peer "$workload" "$client" "$run" "perf serve $kind" -- "${CMD[@]}"
                        stop_peer
                    fi
                else
                    feed=""
                    [ "$workload" = consume ] && feed=parallel
                    client_cmd "$client" "$workload" "$BROKER" "$feed"
                    measure broker "$workload" "$client" "$run" "${feed:+publisher in parallel}" -- "${CMD[@]}"
                fi
            done
        done
    done
    if [ "$target" = broker ] && [ -n "$PREFILL" ]; then
        for client in $CLIENTS; do
            if [ "$client" = ours ] && [ ! -x "$BIN/bench-ours" ]; then
                echo "no pre-filled run for ours: build bench-compare with --features ours" >&2
                continue
            fi
            for run in $(seq "$RUNS"); do
                if [ "$client" = ours ]; then
                    # perf purges its queue first: the same harness with amqp-client.
                    CMD=("$BIN/bench-ours" --url "$BROKER" --workload consume --duration "$DURATION" --size "$SIZE" --feed "prefill:$PREFILL")
                else
                    client_cmd "$client" consume "$BROKER" "prefill:$PREFILL"
                fi
                measure broker consume-prefilled "$client" "$run" "pre-filled $PREFILL" -- "${CMD[@]}"
            done
        done
    fi
done

echo
echo "results ($RUNS x $DURATION s each; CPU = user+sys of the client process per message; logs in $OUT)"
column -t -s $'\t' "$RESULTS"
