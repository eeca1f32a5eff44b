#!/bin/sh
# make cluster: stock circusd running HAProxy in front of bluserver instances (deploy/circus.ini),
# in the foreground. OPERATIONS.md, "Running several instances", says what each signal does.
#
#   tools/cluster.sh VENV_BIN [python -m tools.circus_cluster's options: -p -i -n --cert --run-dir]
#
# tools/circus_cluster.py writes and checks the configurations (and refuses a bad PORT or CERT
# at once); circusd runs them, untouched. This shell adds, from outside circusd, what circusd
# itself cannot do:
#
# - Ctrl-C (or SIGTERM, or the terminal's hang-up) stops HAProxy first, softly (circusctl stop:
#   its stop_signal, USR1), so that nothing new reaches the instances, then circusd stops the
#   instances, which drain. circusd alone would signal them all at once. A command that
#   circusd refuses because another runs (a rolling restart, its periodic check) is retried.
# - A second one, or STOP_TIMEOUT_S (default 300) seconds of stopping, kills circusd, and with
#   it every process it started, their handlers and workers (parent death signals): circusd
#   ignores a second SIGINT while it stops.
# - The exit status says which: 0 if everything drained and exited, 1 if anything was killed.
#
# circusd runs in a session of its own, so that the terminal's signals reach this shell only.
# SIGHUP to circusd (its pid file: RUN_DIR/circusd.pid) is circus's own rolling restart.
set -u

COMMAND_TIMEOUT_S=5    # for circusd to answer one command
TICK_S=0.2             # how often the stop takes its next step
GRACEFUL_TIMEOUT_S=300 # deploy/circus.ini's graceful_timeout

bin=$1
shift
# circus's own graceful_timeout kills silently: this shell's deadline must come first for the
# exit status to say that something was killed.
stop_timeout=${STOP_TIMEOUT_S:-$GRACEFUL_TIMEOUT_S}
case $stop_timeout in
'' | *[!0-9]* | 0*) stop_timeout=$((GRACEFUL_TIMEOUT_S + 1)) ;;
esac
if [ "$stop_timeout" -gt "$GRACEFUL_TIMEOUT_S" ]; then
    echo "cluster: STOP_TIMEOUT_S=$STOP_TIMEOUT_S: whole seconds, 1-$GRACEFUL_TIMEOUT_S" >&2
    exit 1
fi
config=$("$bin/python" -m tools.circus_cluster "$@") || exit 1
run_dir=$(dirname "$config")
control="ipc://$run_dir/control.sock"

say() {
    echo "cluster: $*" >&2 2>/dev/null || true # a closed terminal must not stop the stop
}

# One command to circusd; false if it refused it (circusd runs one command at a time: it
# refuses others during a rolling restart, a stop, or its periodic check of the processes).
circusctl() {
    "$bin/circusctl" --endpoint "$control" --timeout "$COMMAND_TIMEOUT_S" "$@" 2>/dev/null
}

stops=0
killed=0
phase=serving # then: stopping-haproxy, haproxy-stopping, instances-stopping

stop() {
    stops=$((stops + 1))
    if [ "$stops" -gt 1 ]; then
        kill_everything "a second stop signal"
        return
    fi
    say "stopping: HAProxy finishes its connections, then the instances drain" \
        "(Ctrl-C again kills everything)"
    phase=stopping-haproxy
    deadline=$(($(date +%s) + stop_timeout))
}

kill_everything() {
    say "$1: killing circusd, and with it every process of the cluster"
    killed=1
    [ -z "$circusd" ] || kill -KILL "$circusd" 2>/dev/null
}

# The stop, one step a tick: each command is asked again until circusd accepts it.
step() {
    case $phase in
    stopping-haproxy)
        circusctl stop haproxy >/dev/null && phase=haproxy-stopping
        ;;
    haproxy-stopping)
        [ "$(circusctl status haproxy)" = stopped ] && circusctl quit >/dev/null &&
            phase=instances-stopping
        ;;
    esac
    if [ "$phase" != serving ] && [ "$killed" -eq 0 ] && [ "$(date +%s)" -ge "$deadline" ]; then
        kill_everything "still stopping after $stop_timeout s"
    fi
}

# Whether process pid runs: it exists and has not exited (a zombie until waited for).
running() {
    read -r _ _ state _ 2>/dev/null <"/proc/$1/stat" && [ "$state" != Z ]
}

# Set before circusd starts: a signal that killed this shell then would leave circusd running.
circusd=""
trap stop INT TERM HUP

say "circusd $config; each process's log in $run_dir/*.log"
say "Ctrl-C stops; kill -HUP \$(cat $run_dir/circusd.pid) restarts every process in turn"
setsid "$bin/circusd" "$config" </dev/null &
circusd=$!
while running "$circusd"; do
    sleep "$TICK_S"
    step
done
wait "$circusd"
status=$?
if [ "$killed" -eq 1 ]; then
    exit 1
fi
if [ "$stops" -eq 0 ]; then
    say "circusd exited by itself (status $status)"
elif [ "$status" -eq 0 ]; then
    say "stopped: every process drained and exited"
fi
exit "$status"
