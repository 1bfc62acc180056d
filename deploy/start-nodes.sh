#!/usr/bin/env bash
# start-nodes.sh: start dispynode on many hosts over ssh.
#
#   deploy/start-nodes.sh node1 node2 user@node3
#   python3 deploy/check_nodes.py --secret_file ~/.dispy-secret node1 node2 node3
#
# Each host needs, once:
#   ssh HOST 'mkdir -p /opt/dispy' && scp dispy.py dispynode.py HOST:/opt/dispy/
#   ssh HOST 'umask 077; cat > ~/.dispy-secret' < ~/.dispy-secret   # the same secret everywhere
#
# The node runs as the ssh user, keeps running after ssh disconnects (nohup), logs to
# DISPY_DIR/dispynode.log and writes its pid to DISPY_DIR/dispynode.pid; a host where
# that pid is still running is left alone. To stop the nodes (SIGTERM: a clean stop):
#   for h in node1 node2; do ssh "$h" 'kill $(cat /opt/dispy/dispynode.pid)'; done
#
# Environment:
#   DISPY_DIR        folder holding dispy.py and dispynode.py on the hosts (default /opt/dispy)
#   DISPY_PYTHON     Python on the hosts (default python3)
#   DISPYNODE_ARGS   more dispynode options, e.g. "-c -1 --zombie_interval 30"
#   SSH_OPTS         more ssh options, e.g. "-i ~/.ssh/cluster_key"
#
# Exit status 0 if the node was started (or already running) on every host, 1 otherwise.

set -u

if [ $# -eq 0 ]; then
    echo "usage: $0 HOST [HOST...]" >&2
    exit 2
fi

dir=$(printf %q "${DISPY_DIR:-/opt/dispy}")
python=${DISPY_PYTHON:-python3}
# The remote shell expands ~ (the ssh user's home there); --secret_file keeps the secret
# out of "ps" on the host.
node="$python dispynode.py --daemon --secret_file ~/.dispy-secret ${DISPYNODE_ARGS:-}"
remote="cd $dir || exit 1
if [ -f dispynode.pid ] && kill -0 \$(cat dispynode.pid) 2>/dev/null; then
    echo \"dispynode already running (pid \$(cat dispynode.pid))\"
    exit 0
fi
nohup $node > dispynode.log 2>&1 < /dev/null &
echo \$! > dispynode.pid
sleep 2
if kill -0 \$! 2>/dev/null; then
    grep -m1 'serving at' dispynode.log || echo \"dispynode started (pid \$!)\"
else
    echo 'dispynode exited at once:'; tail -5 dispynode.log; exit 1
fi"

failed=0
for host in "$@"; do
    # -n: no stdin (the loop's); BatchMode: fail instead of asking for a password.
    # shellcheck disable=SC2086
    if out=$(ssh -n -o BatchMode=yes -o ConnectTimeout=10 ${SSH_OPTS:-} "$host" "$remote" 2>&1); then
        echo "$host: ${out//$'\n'/ }"
    else
        echo "$host: FAILED: ${out//$'\n'/ }"
        failed=1
    fi
done
exit "$failed"
