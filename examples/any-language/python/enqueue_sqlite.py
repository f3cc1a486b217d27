#!/usr/bin/env python3
"""Places orders in a SQLite database with the standard library's sqlite3, each announced by an
outbox message written in the same transaction: one plain INSERT into the outbox table, which
`outbox-relay run` publishes. The last order is rolled back, and its message with it: it is
never published.

    python enqueue_sqlite.py [--db FILE] [--outbox-table T] [--orders-table T] [--destination D]

Defaults come from DATABASE_PATH (outbox.db), OUTBOX_TABLE (outbox), ORDERS_TABLE (orders) and
OUTBOX_DESTINATION (orders). The outbox table must exist: `outbox-relay migrate` with
`url = "sqlite://FILE"`, or the script `outbox-relay schema --dialect sqlite` prints. Prints one
JSON line per message; "id" is null where the database made the id (SQLite cannot return it).
"""

import argparse
import json
import os
import sqlite3
import uuid


def connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: sqlite3 opens no transaction behind our back; we BEGIN ourselves.
    # timeout: how long a writer waits for another one (the relay included) to finish.
    return sqlite3.connect(path, isolation_level=None, timeout=10)


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def place_order(conn, args, item: str, quantity: int, supply_id: bool, commit: bool = True) -> dict:
    # IMMEDIATE takes the write lock at once, so that two writers queue up (for `timeout`)
    # instead of failing with "database is locked" when the first one writes.
    conn.execute("BEGIN IMMEDIATE")
    try:
        order_id = conn.execute(
            f"INSERT INTO {quoted(args.orders_table)} (item, quantity) VALUES (?, ?)", (item, quantity)
        ).lastrowid

        key = f"order-{order_id}"  # messages of one key are published in enqueue order
        payload = json.dumps({"order_id": order_id, "item": item, "quantity": quantity})
        headers = {"type": "OrderPlaced", "content-type": "application/json", "trace": uuid.uuid4().hex}
        # With an id of our own (16 big-endian bytes) we know the message id; without one the
        # database makes 16 random bytes. Either way it fills in the partition and the timestamps (the
        # INSERT then reports 0 rows changed: a trigger writes the completed row).
        message_id = uuid.uuid4() if supply_id else None
        conn.execute(
            f'INSERT INTO {quoted(args.outbox_table)} (id, destination, "key", payload, headers)'
            " VALUES (?, ?, ?, ?, ?)",
            (message_id and message_id.bytes, args.destination, key, payload.encode(), json.dumps(headers)),
        )

        message = {"id": message_id and str(message_id), "destination": args.destination, "key": key,
                   "headers": headers, "payload": payload, "committed": commit}
        # A ROLLBACK (here on purpose, or below on any error) takes the order and its message.
        conn.execute("COMMIT" if commit else "ROLLBACK")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return message


def main() -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=env("DATABASE_PATH", "outbox.db"))
    parser.add_argument("--outbox-table", default=env("OUTBOX_TABLE", "outbox"))
    parser.add_argument("--orders-table", default=env("ORDERS_TABLE", "orders"))
    parser.add_argument("--destination", default=env("OUTBOX_DESTINATION", "orders"))
    args = parser.parse_args()

    conn = connect(args.db)
    try:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted(args.orders_table)} (id INTEGER PRIMARY KEY,"
            " item TEXT NOT NULL, quantity INTEGER NOT NULL, placed_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        for item, quantity, supply_id, commit in [
            ("book", 1, False, True), ("lamp", 2, True, True), ("kettle", 1, True, False),
        ]:
            print(json.dumps(place_order(conn, args, item, quantity, supply_id, commit)), flush=True)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
