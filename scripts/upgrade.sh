#!/usr/bin/env bash
# Zero-downtime binary upgrade of a running tollgate (Linux).
#
#   scripts/upgrade.sh NEW_BINARY CONFIG
#
# 1. Start NEW_BINARY with --upgrade (-u) and the same configuration: it waits on
#    server.upgrade_sock for the listening sockets.
# 2. SIGQUIT the old process (pid from server.pid_file): it hands the sockets over, keeps
#    serving for 5 s while the new one starts, then drains like SIGTERM.
# No connection is refused. The new process runs in the background (--daemon).
set -euo pipefail
bin=${1:?usage: upgrade.sh NEW_BINARY CONFIG}
conf=${2:?usage: upgrade.sh NEW_BINARY CONFIG}

"$bin" -t -c "$conf" >/dev/null            # refuse to start a broken configuration
pid_file=$("$bin" -t -c "$conf" >/dev/null && sed -n 's/^[[:space:]]*pid_file:[[:space:]]*//p' "$conf" | head -n1)
pid_file=${pid_file:-/tmp/tollgate.pid}
old=$(cat "$pid_file")
kill -0 "$old"                              # the old process must be running

# The new process waits for the sockets before it daemonizes, and they come only once the old
# one gets SIGQUIT: start it in the background, then signal.
"$bin" -u -d -c "$conf" &
launcher=$!
sleep 1                                     # let it reach the upgrade socket
if ! kill -0 "$launcher" 2>/dev/null; then  # gone already: keep the old process serving
  wait "$launcher" || true
  echo "the new binary exited before taking over; the old pid $old keeps serving" >&2
  exit 1
fi
kill -QUIT "$old"
if ! wait "$launcher"; then                 # it returns once the daemon has forked off
  echo "the new binary did not start; the old pid $old may be draining: restart it if so" >&2
  exit 1
fi
for _ in $(seq 1 60); do
  kill -0 "$old" 2>/dev/null || { echo "upgraded: old pid $old exited, new pid $(cat "$pid_file")"; exit 0; }
  sleep 1
done
echo "old pid $old still running after 60 s (draining long requests?)" >&2
exit 1
