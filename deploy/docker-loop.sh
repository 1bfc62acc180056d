#!/usr/bin/env bash
# docker-loop.sh: a fresh dispynode container for each client, one after another.
#
#   deploy/docker-loop.sh            # forever (Ctrl-C or SIGTERM stops the node and the loop)
#
# This is the dispycos recipe "while :; do docker run --net=host -it pycos dispycosnode.py
# --serve 1; done" adapted to dispynode. The image's node (deploy/Dockerfile) exits once
# its client closes (--serve 1); the container is removed (--rm) and the loop starts a new
# one from the image, so every client starts in the same clean environment.
#
# Environment:
#   DISPY_IMAGE        the image (default dispynode: docker build -f deploy/Dockerfile -t dispynode .)
#   DISPY_SECRET_FILE  the secret, a file on this host (default /etc/dispy/secret); it is
#                      mounted read-only and the container runs as the file's owner (so a
#                      secret file of mode 600 can be read inside): give it to an
#                      unprivileged user (chown dispy:dispy), not root
#   DISPYNODE_ARGS     more dispynode options, e.g. "-c 4 --name gpu1"
#   DISPYNODE_CMD      the command run each time instead of that "docker run ..." line
#                      (a shell command line; the tests run dispynode.py directly with it)
#   LOOP_COUNT         stop after this many runs (default 0: never)
#   LOOP_DELAY         seconds to wait after a run that failed (default 5), so that a missing
#                      image or a bad option does not restart it hundreds of times a second
#
# Exit status: the last run's (0 when the node ended normally or was stopped by a signal).

set -u

LOOP_COUNT=${LOOP_COUNT:-0}
LOOP_DELAY=${LOOP_DELAY:-5}
case $LOOP_COUNT in ''|*[!0-9]*) echo "docker-loop: LOOP_COUNT must be a number" >&2; exit 2;; esac
case $LOOP_DELAY in ''|*[!0-9.]*) echo "docker-loop: LOOP_DELAY must be a number" >&2; exit 2;; esac

if [ -z "${DISPYNODE_CMD:-}" ]; then
    secret_file=${DISPY_SECRET_FILE:-/etc/dispy/secret}
    owner=$(stat -c %u:%g "$secret_file") || exit 1
    # --init: a small init reaps processes that jobs leave behind (the node is not PID 1).
    DISPYNODE_CMD="docker run --rm --init --network host --user $owner"
    DISPYNODE_CMD+=" -v $(printf %q "$secret_file"):/run/secrets/dispy:ro"
    DISPYNODE_CMD+=" ${DISPY_IMAGE:-dispynode} --secret_file /run/secrets/dispy ${DISPYNODE_ARGS:-}"
fi

# The node runs in the background so that a signal reaches this script at once (bash
# runs traps only between commands): the trap passes SIGTERM on to the node, which stops
# its jobs and exits, and the loop ends.
child=
stopping=0
stop() {
    stopping=1
    if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; fi
}
trap stop TERM INT HUP

run=0
status=0
while [ "$stopping" = 0 ]; do
    run=$((run + 1))
    echo "docker-loop: run $run: $DISPYNODE_CMD" >&2
    # exec: the child is the node (or docker run) itself, which gets the signal.
    bash -c "exec $DISPYNODE_CMD" &
    child=$!
    wait "$child"
    status=$?
    # A trapped signal interrupts wait (status > 128): wait for the node's own exit.
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"
        status=$?
    done
    child=
    if [ "$LOOP_COUNT" -gt 0 ] && [ "$run" -ge "$LOOP_COUNT" ]; then
        break
    fi
    if [ "$status" -ne 0 ] && [ "$stopping" = 0 ]; then
        echo "docker-loop: run $run ended with status $status; next run in ${LOOP_DELAY}s" >&2
        sleep "$LOOP_DELAY" &
        child=$!
        wait "$child"
        child=
    fi
done
echo "docker-loop: done after $run run(s), last status $status" >&2
exit "$status"
