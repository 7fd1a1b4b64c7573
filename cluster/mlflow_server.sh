#!/usr/bin/env bash
# The head's MLflow tracking server for the checkout in the current directory, unless it runs.
#   cd <checkout> && bash cluster/mlflow_server.sh [--restart]
# cluster/*.yaml's head_start_ray_commands run it; cluster/run_pipeline.py runs it again (with
# --restart when a submit's LOWLABEL_RESULTS moves the artifacts).
#
# 127.0.0.1 only: the stages run on the head and worker metrics reach MLflow through a Ray actor
# on the head; from a laptop, tunnel: `ray attach cluster/config.yaml -p 5000` or `ssh -L 5000:127.0.0.1:5000`.
# Backend: sqlite in the checkout. Artifacts: $LOWLABEL_RESULTS/mlartifacts when a submit forwarded
# a results URI (kept in ~/.lowlabel/cluster.env), else <checkout>/mlartifacts. The server is the
# one that writes artifacts there, so it needs the storage settings (AWS_ENDPOINT_URL from
# cluster.env, credentials from the AWS chain: instance role, ~/.aws); its clients need none.
set -u
root="$PWD"
state="${LOWLABEL_STATE_DIR:-$HOME/.lowlabel}"
port="${LOWLABEL_MLFLOW_PORT:-5000}"
mkdir -p "$state"
if [ -f "$state/cluster.env" ]; then set -a; . "$state/cluster.env"; set +a; fi
backend="sqlite:///$root/mlflow.db"
if [ -n "${LOWLABEL_RESULTS:-}" ]; then dest="${LOWLABEL_RESULTS%/}/mlartifacts"; else dest="$root/mlartifacts"; fi

# "[m]lflow": the pattern must not match this script's shell, nor the `bash -c '<cmd>'` Ray wraps
# a start command in (a plain "mlflow server" pattern matches its own shell: nothing would start).
pattern="[m]lflow server --backend-store-uri $backend "
pids="$(pgrep -f "$pattern" || true)"
if [ -n "$pids" ]; then
  if [ "${1:-}" != "--restart" ]; then
    echo "mlflow server for $backend already running (pid $(echo $pids))"
    exit 0
  fi
  kill $pids 2>/dev/null || true
  for _ in $(seq 40); do pgrep -f "$pattern" >/dev/null || break; sleep 0.5; done
fi
echo "$dest" > "$state/mlflow-server.destination"
# setsid + nohup: a dropped ssh session (SIGHUP) or a Ctrl-C in it does not reach the server.
setsid nohup env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
  mlflow server --backend-store-uri "$backend" --artifacts-destination "$dest" \
  --host 127.0.0.1 --port "$port" --workers 1 >> "$state/mlflow-server.log" 2>&1 < /dev/null &
echo "mlflow server starting (pid $!): http://127.0.0.1:$port, artifacts $dest, log $state/mlflow-server.log"
