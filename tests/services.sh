#!/usr/bin/env bash
# Make sure the services the integration tests talk to are up on 127.0.0.1 (start them when they are not).
set -euo pipefail

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432 >/dev/null || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }

# RabbitMQ, for the AMQP broker tests (each test makes a virtual host of its own with rabbitmqctl).
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        echo "installing Debian's rabbitmq-server for the RabbitMQ broker tests"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null) \
            || { echo "could not install rabbitmq-server (apt-get install rabbitmq-server)" >&2; exit 1; }
    fi
    echo "starting RabbitMQ"
    rabbitmq-server -detached
    for _ in $(seq 90); do rabbit_up && break; sleep 1; done
    rabbitmqctl -q await_startup >/dev/null 2>&1 || true
fi
rabbit_up || { echo "RabbitMQ is not reachable on 127.0.0.1:5672" >&2; exit 1; }

# Debian's Chromium renders the HTML report in tests/test_report.py.
if ! command -v chromium >/dev/null 2>&1; then
    echo "installing Debian's chromium for the report screenshot test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || { echo "could not install chromium (apt-get install chromium)" >&2; exit 1; }
fi
