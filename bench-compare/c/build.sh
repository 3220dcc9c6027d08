#!/usr/bin/env bash
# Builds the rabbitmq-c programs into bench-compare/target/, installing
# Debian's librabbitmq-dev first if it is missing (as root, or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s librabbitmq-dev >/dev/null 2>&1; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get install -y librabbitmq-dev
fi
mkdir -p target
cc -O2 -Wall -o target/latency c/latency.c -lrabbitmq -lpthread
cc -O2 -Wall -o target/rpc c/rpc.c -lrabbitmq
echo "built target/latency and target/rpc against rabbitmq-c $(dpkg-query -W -f '${Version}' librabbitmq-dev)"
