#!/usr/bin/env bash
# Starts tansu, a Kafka-protocol broker, on loopback for the outbox-kafka tests, installing it
# first when missing. Idempotent: does nothing when something already answers on the port.
#
#   outbox-kafka/scripts/start-tansu.sh            # 127.0.0.1:9092
#   TANSU_PORT=19092 outbox-kafka/scripts/start-tansu.sh
#
# Storage is in memory: restarting the broker loses every topic.
set -euo pipefail

host=127.0.0.1
port="${TANSU_PORT:-9092}"
version="${TANSU_VERSION:-0.6.0}"
log="${TANSU_LOG:-${TMPDIR:-/tmp}/tansu-${port}.log}"
wait_secs="${TANSU_WAIT_SECS:-60}"

listening() {
    (exec 3<>"/dev/tcp/${host}/${port}") 2>/dev/null
}

if listening; then
    echo "a broker already listens on ${host}:${port}"
    exit 0
fi

tansu="$(command -v tansu || true)"
if [ -z "${tansu}" ] && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]; then
    tansu="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
fi
if [ -z "${tansu}" ]; then
    # About 7 minutes and 1.7 GB of memory on 2 cores; `dynostore` brings in-memory storage.
    echo "installing tansu ${version}"
    cargo install tansu --version "${version}" --locked --features dynostore
    tansu="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
fi

echo "starting tansu on ${host}:${port} (log: ${log})"
setsid nohup "${tansu}" broker \
    --listener-url "tcp://${host}:${port}" \
    --advertised-listener-url "tcp://${host}:${port}" \
    --storage-engine memory://tansu/ \
    --silent >"${log}" 2>&1 </dev/null &

for _ in $(seq 1 $((wait_secs * 10))); do
    if listening; then
        echo "tansu is up on ${host}:${port}"
        exit 0
    fi
    sleep 0.1
done
echo "tansu did not answer on ${host}:${port} within ${wait_secs}s; log follows" >&2
cat "${log}" >&2 || true
exit 1
