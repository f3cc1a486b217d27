"""The writer examples against real servers: each writes orders and their outbox messages with a
plain INSERT, the real `outbox-relay run` binary publishes them, and the broker's own Python
client reads them back. Every committed message must arrive with its id, key, headers and
payload unchanged; the rolled-back one must never arrive.

Servers (defaults on loopback, as for the workspace's Rust tests): OUTBOX_TEST_POSTGRES_URL,
OUTBOX_TEST_MYSQL_URL, OUTBOX_TEST_AMQP_URL, OUTBOX_TEST_NATS_URL, OUTBOX_TEST_KAFKA_BROKERS. A
test whose server is unreachable is skipped, or fails with OUTBOX_TEST_REQUIRE=1. The relay is
OUTBOX_RELAY_BIN, by default the workspace's target/debug/outbox-relay.
"""

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

EXAMPLES = Path(__file__).resolve().parents[1]  # examples/any-language
REPO = EXAMPLES.parents[1]
RELAY_BIN = Path(os.environ.get("OUTBOX_RELAY_BIN") or REPO / "target" / "debug" / "outbox-relay")


def setting(var: str, default: str) -> str:
    return os.environ.get(var) or default


POSTGRES_URL = setting("OUTBOX_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
MYSQL_URL = setting("OUTBOX_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
AMQP_URL = setting("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
NATS_URL = setting("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222")
KAFKA_BROKERS = setting("OUTBOX_TEST_KAFKA_BROKERS", "127.0.0.1:9092")
REQUIRED = os.environ.get("OUTBOX_TEST_REQUIRE", "").lower() in ("1", "true")

ARRIVAL_TIMEOUT = 30.0  # for every committed message to reach the broker
QUIET_PERIOD = 2.0  # after they did: nothing else may arrive (the rolled-back message)


def unavailable(service: str, err: BaseException):
    err = str(err) or repr(err)
    if REQUIRED:
        pytest.fail(f"{service} is required (OUTBOX_TEST_REQUIRE=1) but unreachable: {err}")
    pytest.skip(f"{service} unreachable: {err} (set OUTBOX_TEST_REQUIRE=1 to fail instead)")


def unique(prefix: str) -> str:
    """A name of this test's own: table, topic, stream, subject token, queue, exchange."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cleanup():
    """Registers undo steps; they run in reverse order at the end of the test, failed or not."""
    steps = []
    yield steps.append
    errors = []
    for step in reversed(steps):
        try:
            step()
        except Exception as err:  # noqa: BLE001 - report them all, after trying them all
            errors.append(f"{getattr(step, '__name__', step)}: {err!r}")
    assert not errors, f"cleanup failed: {errors}"


# ---------------------------------------------------------------------------------------------
# The relay


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def relay_env() -> dict:
    # The test's configuration file only: no OUTBOX_<SECTION>__<KEY> from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_") and k != "RUST_LOG"}
    env["NO_COLOR"] = "1"
    return env


class Relay:
    """`outbox-relay` with a configuration file of the test's own."""

    def __init__(self, tmp_path: Path, store_url: str, table: str, publisher: str):
        if not RELAY_BIN.is_file():
            pytest.fail(f"no relay binary at {RELAY_BIN}: `cargo build -p outbox-relay`, or set OUTBOX_RELAY_BIN")
        self.config = tmp_path / "relay.toml"
        self.config.write_text(f"""
[store]
url = "{store_url}"
table = "{table}"
retention = "1h"          # keep published rows: the test compares them with what arrived

[publisher]
{publisher}

[relay]
poll_max = "100ms"        # MySQL and SQLite have no notifications: the relay polls
shutdown_timeout = "5s"

[http]
listen = "127.0.0.1:0"    # any free port: relays of tests side by side
""")
        self.log = tmp_path / "relay.log"
        self.process = None

    def __call__(self, *args: str) -> str:
        """Runs a subcommand to its end; its stdout. It must succeed."""
        out = subprocess.run([RELAY_BIN, "--config", self.config, *args], capture_output=True, text=True,
                             env=relay_env(), timeout=60)
        assert out.returncode == 0, f"outbox-relay {' '.join(args)}: exit {out.returncode}\n{plain(out.stdout + out.stderr)}"
        return out.stdout

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([RELAY_BIN, "--config", self.config, "run"], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=relay_env())

    def stop(self) -> None:
        """SIGTERM: the relay must exit 0, within its shutdown_timeout and a little more."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the relay did not stop within 15 s of SIGTERM\n{self.log_text()}")
        assert code == 0, f"the relay exited {code} on SIGTERM\n{self.log_text()}"

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def assert_running(self) -> None:
        assert self.process.poll() is None, f"the relay exited {self.process.returncode}\n{self.log_text()}"

    def log_text(self) -> str:
        return plain(self.log.read_text(errors="replace")) if self.log.exists() else ""

    def assert_drained(self, published: int) -> None:
        status = json.loads(self("status", "--json"))
        assert (status["pending"], status["dead"], status["published_retained"]) == (0, 0, published), status


@pytest.fixture
def relay(tmp_path, cleanup):
    def make(store_url: str, table: str, publisher: str) -> Relay:
        r = Relay(tmp_path, store_url, table, publisher)
        cleanup(r.kill)  # whatever happens to the test, no relay outlives it
        return r

    return make


# ---------------------------------------------------------------------------------------------
# The writers


def run_writer(command: list, env: dict | None = None) -> list:
    """Runs a writer example; the messages it printed, one JSON object a line."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=EXAMPLES,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"{command}: exit {out.returncode}\n{out.stdout}{out.stderr}"
    messages = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    committed = [m for m in messages if m["committed"]]
    assert len(committed) >= 2 and len(messages) > len(committed), f"committed and rolled back: {messages}"
    return messages


def python_writer(name: str, *args: str) -> list:
    return run_writer([sys.executable, str(EXAMPLES / "python" / name), *args])


def check_table(messages: list, rows: dict, v7: bool = True) -> list:
    """Compares the writer's messages with the outbox rows by key ({key: (id, destination,
    payload, headers)}), fills in the ids the database made (UUID v7 where `v7`; SQLite makes 16
    random bytes), and returns the committed messages."""
    committed = [m for m in messages if m["committed"]]
    for m in messages:
        if not m["committed"]:
            assert m["key"] not in rows, f"the rolled-back message is in the table: {m}"
    assert len(rows) == len(committed), rows
    for m in committed:
        row_id, destination, payload, headers = rows[m["key"]]
        if m["id"] is None and v7:
            assert uuid.UUID(row_id).version == 7, f"the database makes UUID v7 ids: {row_id}"
        assert m["id"] in (None, row_id), (m, row_id)
        m["id"] = row_id
        assert (destination, payload, json.loads(headers)) == (m["destination"], m["payload"].encode(), m["headers"])
    assert len({m["id"] for m in committed}) == len(committed), "ids are unique"
    return committed


def check_arrivals(received: list, messages: list, expect) -> None:
    """`received`: what the broker delivered, each {"id", "key", "headers", "payload", ...}
    (payload as bytes); `expect(message)` turns a committed message into what it must arrive as.
    Duplicates are allowed (delivery is at least once), but each copy must be exact."""
    committed = {m["id"]: expect(m) for m in messages if m["committed"]}
    rolled_back = [m for m in messages if not m["committed"]]
    for got in received:
        assert all(got["key"] != m["key"] and got["id"] != m["id"] for m in rolled_back), \
            f"a rolled-back message was published: {got}"
        assert got["id"] in committed, f"a message nobody committed: {got}"
        assert got == committed[got["id"]], "the message arrived changed"
    missing = set(committed) - {got["id"] for got in received}
    assert not missing, f"never arrived: {[committed[i] for i in missing]}"


def collect(poll, wanted: int, timeout: float = ARRIVAL_TIMEOUT, quiet: float = QUIET_PERIOD) -> list:
    """Calls `poll(seconds)` (a list of messages, maybe empty) until `wanted` distinct ids came or
    `timeout` passed, then for `quiet` seconds more: whatever else arrives is returned too."""
    got, ids = [], set()
    deadline = time.monotonic() + timeout
    while len(ids) < wanted and time.monotonic() < deadline:
        for m in poll(min(0.5, max(0.01, deadline - time.monotonic()))):
            got.append(m)
            ids.add(m["id"])
    if len(ids) >= wanted:
        end = time.monotonic() + quiet
        while time.monotonic() < end:
            got.extend(poll(min(0.5, max(0.01, end - time.monotonic()))))
    return got


# ---------------------------------------------------------------------------------------------
# Databases


def postgres(cleanup, table: str, orders: str):
    """A psycopg connection (autocommit); the outbox's and the orders' tables are dropped at
    the end, with the outbox's functions."""
    import psycopg

    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        unavailable("PostgreSQL", err)

    def drop_postgres_tables():
        conn.execute(f'DROP TABLE IF EXISTS "{table}", "{table}_partitions", "{table}_relays", '
                     f'"{table}_schema", "{orders}"')
        conn.execute(f'DROP FUNCTION IF EXISTS "{table}_claim"(TEXT, BIGINT, UUID, BIGINT), '
                     f'"{table}_fill"(), "{table}_notify"(), "{table}_uuid7"()')
        conn.close()

    cleanup(drop_postgres_tables)
    return conn


def postgres_rows(conn, table: str) -> dict:
    return {key: (str(id_), destination, bytes(payload), headers)
            for id_, destination, key, payload, headers in conn.execute(
                f'SELECT id, destination, "key", payload, headers FROM "{table}" ORDER BY seq')}


def mysql(cleanup, table: str, orders: str):
    """A PyMySQL connection (autocommit); the outbox's and the orders' tables are dropped at the
    end."""
    import pymysql

    u = urlsplit(MYSQL_URL)
    try:
        conn = pymysql.connect(host=u.hostname, port=u.port or 3306, user=u.username or "root",
                               password=u.password or "", database=u.path.lstrip("/"),
                               autocommit=True, connect_timeout=5)
    except pymysql.err.OperationalError as err:
        unavailable("MariaDB/MySQL", err)

    def drop_mysql_tables():
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{table}`, `{table}_partitions`, `{table}_relays`, "
                        f"`{table}_schema`, `{orders}`")
        conn.close()

    cleanup(drop_mysql_tables)
    return conn


# ---------------------------------------------------------------------------------------------
# Brokers


def kafka_topic(cleanup, topic: str, partitions: int = 3):
    """Creates `topic` (the publisher creates none) and deletes it at the end."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": KAFKA_BROKERS, "log_level": 0})
    try:
        admin.list_topics(timeout=5)
    except KafkaException as err:
        unavailable("Kafka", err)
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(timeout=15)

    def delete_kafka_topic():
        admin.delete_topics([topic], operation_timeout=10)[topic].result(timeout=15)

    cleanup(delete_kafka_topic)
    return partitions


def read_kafka(topic: str, partitions: int, wanted: int) -> list:
    """Reads the topic from its beginning with confluent-kafka: each record as (id, key,
    headers, payload), plus where it was."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": KAFKA_BROKERS, "group.id": unique("reader"),
                         "enable.auto.commit": False, "log_level": 0})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])

    def poll(seconds):
        record = consumer.poll(seconds)
        if record is None:
            return []
        assert record.error() is None, record.error()
        headers = [(name, value.decode()) for name, value in record.headers() or []]
        assert len({name for name, _ in headers}) == len(headers), f"a header twice: {headers}"
        headers = dict(headers)
        return [{"id": headers.get("outbox-message-id"), "key": record.key().decode(),
                 "headers": headers, "payload": record.value(), "topic": record.topic()}]

    try:
        return collect(poll, wanted)
    finally:
        consumer.close()


def kafka_record(topic: str):
    def expect(m):
        return {"id": m["id"], "key": m["key"], "headers": {**m["headers"], "outbox-message-id": m["id"]},
                "payload": m["payload"].encode(), "topic": topic}
    return expect


class JetStream:
    """nats-py on an event loop of its own, driven from the synchronous test."""

    def __init__(self, cleanup):
        import nats

        async def quiet(_err):
            pass

        self.loop = asyncio.new_event_loop()
        # One retry at most: nats-py retries a refused first connection whatever allow_reconnect says.
        connecting = nats.connect(NATS_URL, connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=1,
                                  reconnect_time_wait=0.1, error_cb=quiet)
        try:
            self.nc = self.run(connecting, timeout=10)
        except Exception as err:  # noqa: BLE001 - whatever keeps us from connecting
            self.loop.close()
            unavailable("NATS", err)
        self.js = self.nc.jetstream()
        cleanup(self.close)

    def run(self, coroutine, timeout: float = 30):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def close(self):
        self.run(self.nc.close())
        self.loop.close()

    def delete_stream(self, stream: str):
        import nats.js.errors

        try:
            self.run(self.js.delete_stream(stream))
        except nats.js.errors.NotFoundError:
            pass

    def read(self, stream: str, subjects: str, wanted: int) -> list:
        """Reads the stream from its beginning with an ordered consumer."""
        import nats.errors

        sub = self.run(self.js.subscribe(subjects, stream=stream, ordered_consumer=True))

        def poll(seconds):
            try:
                msg = self.run(sub.next_msg(timeout=seconds), timeout=seconds + 5)
            except nats.errors.TimeoutError:
                return []
            headers = dict(msg.headers or {})
            return [{"id": headers.get("Nats-Msg-Id"), "key": headers.get("Outbox-Key"), "headers": headers,
                     "payload": msg.data, "subject": msg.subject}]

        try:
            return collect(poll, wanted)
        finally:
            self.run(sub.unsubscribe())


# ---------------------------------------------------------------------------------------------
# The tests


def test_psycopg_to_nats_on_tables_made_by_the_schema_script(tmp_path, cleanup, relay):
    """psycopg 3 writes to PostgreSQL tables created by running `outbox-relay schema` through
    psycopg (as a migration tool would); the relay publishes to NATS JetStream, into a stream
    it creates itself (`ensure_stream`); nats-py reads them with an ordered consumer."""
    table, orders = unique("anylang_pg_nats"), unique("anylang_orders")
    stream, prefix = unique("ANYLANG").upper(), unique("anylang")
    conn = postgres(cleanup, table, orders)
    js = JetStream(cleanup)
    cleanup(lambda: js.delete_stream(stream))

    script = subprocess.run([RELAY_BIN, "schema", "--dialect", "postgres", "--table", table],
                            capture_output=True, text=True, check=True, env=relay_env(), timeout=30).stdout
    conn.execute(script)  # psycopg runs a multi-statement script as one query

    r = relay(POSTGRES_URL, table, f"""kind = "nats"
url = "{NATS_URL}"
subject_prefix = "{prefix}"
ensure_stream = {{ name = "{stream}", subjects = ["{prefix}.>"], memory = true }}""")
    r("check")  # configuration, store and broker; creates the stream
    r.start()
    destination = "orders.placed"
    messages = python_writer("enqueue_postgres.py", "--url", POSTGRES_URL, "--outbox-table", table,
                             "--orders-table", orders, "--destination", destination)
    assert all(uuid.UUID(m["id"]).version == 7 for m in messages), "RETURNING id gives the UUID v7 made"
    committed = check_table(messages, postgres_rows(conn, table))

    received = js.read(stream, f"{prefix}.>", len(committed))
    r.assert_running()
    check_arrivals(received, messages, lambda m: {
        "id": m["id"], "key": m["key"], "payload": m["payload"].encode(), "subject": f"{prefix}.{destination}",
        "headers": {**m["headers"], "Nats-Msg-Id": m["id"], "outbox-message-id": m["id"], "Outbox-Key": m["key"]},
    })
    r.stop()
    r.assert_drained(len(committed))


def test_pymysql_to_rabbitmq(tmp_path, cleanup, relay):
    """PyMySQL writes to MariaDB/MySQL tables made by `outbox-relay migrate`, one message with
    an id the database makes and one with the writer's own; the relay publishes to RabbitMQ,
    destination "{exchange}/{routing key}" (routing = "split"), and pika reads the queue bound
    to the exchange."""
    import pika
    import pika.exceptions

    table, orders = unique("anylang_my_amqp"), unique("anylang_orders")
    exchange, queue = unique("anylang_shop"), unique("anylang_billing")
    conn = mysql(cleanup, table, orders)

    params = pika.URLParameters(AMQP_URL)
    params.socket_timeout = params.blocked_connection_timeout = 5
    params.connection_attempts = 1
    try:
        amqp = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as err:
        unavailable("RabbitMQ", err)
    channel = amqp.channel()

    def delete_amqp_topology():
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        amqp.close()

    cleanup(delete_amqp_topology)
    # The topology is the application's (the publisher declares none); the default `unroutable
    # = "fail"` would dead-letter a message published before its queue is bound.
    channel.exchange_declare(exchange, exchange_type="topic")
    channel.queue_declare(queue)
    channel.queue_bind(queue, exchange, routing_key="order.*")

    r = relay(MYSQL_URL, table, f'kind = "amqp"\nuri = "{AMQP_URL}"\nrouting = "split"')
    r("migrate")
    r.start()
    routing_key = "order.placed"
    messages = python_writer("enqueue_mysql.py", "--url", MYSQL_URL, "--outbox-table", table,
                             "--orders-table", orders, "--destination", f"{exchange}/{routing_key}")
    assert any(m["id"] is None for m in messages) and any(m["id"] for m in messages), "both kinds of id"
    with conn.cursor() as cur:
        cur.execute(f"SELECT HEX(id), destination, `key`, payload, headers FROM `{table}` ORDER BY seq")
        rows = {key: (str(uuid.UUID(hex_id)), destination, payload, headers)
                for hex_id, destination, key, payload, headers in cur.fetchall()}
    committed = check_table(messages, rows)

    deliveries = channel.consume(queue, auto_ack=True, inactivity_timeout=0.25)

    def poll(_seconds):
        method, props, body = next(deliveries)
        if method is None:
            return []
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in (props.headers or {}).items()}
        return [{"id": props.message_id, "key": headers.get("outbox-key"), "headers": headers, "payload": body,
                 "exchange": method.exchange, "routing_key": method.routing_key,
                 "content_type": props.content_type, "delivery_mode": props.delivery_mode}]

    received = collect(poll, len(committed))
    channel.cancel()
    r.assert_running()
    check_arrivals(received, messages, lambda m: {
        "id": m["id"], "key": m["key"], "payload": m["payload"].encode(),
        "headers": {**m["headers"], "outbox-message-id": m["id"], "outbox-key": m["key"]},
        "exchange": exchange, "routing_key": routing_key, "content_type": "application/json", "delivery_mode": 2,
    })
    r.stop()
    r.assert_drained(len(committed))


def test_sqlite3_to_kafka(tmp_path, cleanup, relay):
    """The standard library's sqlite3 writes to a SQLite file migrated by `outbox-relay
    migrate` (one message with an id the database makes, two with the writer's own); the relay
    publishes to Kafka, topic = topic_prefix + destination; confluent-kafka reads the topic."""
    topic_prefix = unique("anylang") + "."
    topic = topic_prefix + "orders"
    partitions = kafka_topic(cleanup, topic)
    db = tmp_path / "shop.db"
    table, orders = "outbox", "orders"

    r = relay(f"sqlite://{db}?mode=rwc", table,
              f'kind = "kafka"\nbrokers = "{KAFKA_BROKERS}"\ntopic_prefix = "{topic_prefix}"')
    r("migrate")
    r.start()
    messages = python_writer("enqueue_sqlite.py", "--db", str(db), "--outbox-table", table,
                             "--orders-table", orders, "--destination", "orders")
    assert any(m["id"] is None for m in messages) and any(m["id"] for m in messages), "both kinds of id"
    with sqlite3.connect(db) as conn:
        rows = {key: (str(uuid.UUID(bytes=id_)), destination, payload, headers)
                for id_, destination, key, payload, headers in conn.execute(
                    f'SELECT id, destination, "key", payload, headers FROM "{table}" ORDER BY seq')}
    conn.close()
    committed = check_table(messages, rows, v7=False)

    received = read_kafka(topic, partitions, len(committed))
    r.assert_running()
    check_arrivals(received, messages, kafka_record(topic))
    r.stop()
    r.assert_drained(len(committed))


def test_node_pg_to_kafka(tmp_path, cleanup, relay):
    """Node.js with `pg` writes to PostgreSQL tables made by `outbox-relay migrate`, configured
    by environment variables; the relay publishes to Kafka with the destination mapped to a
    topic of another name (`topics`); confluent-kafka reads it."""
    if not (EXAMPLES / "node" / "node_modules" / "pg").is_dir():
        pytest.fail("node/node_modules is missing: run `npm ci` in node/ (run-tests.sh does)")
    table, orders = unique("anylang_node_kafka"), unique("anylang_orders")
    topic = unique("anylang_orders_v2")
    conn = postgres(cleanup, table, orders)
    partitions = kafka_topic(cleanup, topic)

    r = relay(POSTGRES_URL, table,
              f'kind = "kafka"\nbrokers = "{KAFKA_BROKERS}"\ntopics = {{ orders = "{topic}" }}')
    r("migrate")
    r.start()
    messages = run_writer(["node", str(EXAMPLES / "node" / "enqueue_postgres.js"), POSTGRES_URL],
                          env={"OUTBOX_TABLE": table, "ORDERS_TABLE": orders, "OUTBOX_DESTINATION": "orders"})
    assert all(uuid.UUID(m["id"]).version == 7 for m in messages), "RETURNING id gives the UUID v7 made"
    committed = check_table(messages, postgres_rows(conn, table))

    received = read_kafka(topic, partitions, len(committed))
    r.assert_running()
    check_arrivals(received, messages, kafka_record(topic))
    r.stop()
    r.assert_drained(len(committed))
