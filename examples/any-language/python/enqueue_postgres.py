#!/usr/bin/env python3
"""Places orders on PostgreSQL with psycopg 3, each announced by an outbox message written in
the same transaction: one plain INSERT into the outbox table, which `outbox-relay run`
publishes. The last order is rolled back, and its message with it: it is never published.

    python enqueue_postgres.py [--url URL] [--outbox-table T] [--orders-table T] [--destination D]

Defaults come from DATABASE_URL, OUTBOX_TABLE (outbox), ORDERS_TABLE (orders) and
OUTBOX_DESTINATION (orders). The outbox table must exist: `outbox-relay migrate`, or the
script `outbox-relay schema --dialect postgres` prints. Prints one JSON line per message.
"""

import argparse
import json
import os
import uuid

import psycopg
from psycopg import sql


def table(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split("."))  # "schema.table" or "table"


def place_order(conn, args, item: str, quantity: int, commit: bool = True) -> dict:
    with conn.transaction():  # commits at the end of the block, rolls back on an exception
        order_id = conn.execute(
            sql.SQL("INSERT INTO {} (item, quantity) VALUES (%s, %s) RETURNING id").format(
                table(args.orders_table)
            ),
            (item, quantity),
        ).fetchone()[0]

        key = f"order-{order_id}"  # messages of one key are published in enqueue order
        payload = json.dumps({"order_id": order_id, "item": item, "quantity": quantity})
        headers = {"type": "OrderPlaced", "content-type": "application/json", "trace": uuid.uuid4().hex}
        # The database fills in the id (a UUID v7), the partition and the timestamps.
        message_id = conn.execute(
            sql.SQL(
                'INSERT INTO {} (destination, "key", payload, headers) VALUES (%s, %s, %s, %s) RETURNING id'
            ).format(table(args.outbox_table)),
            (args.destination, key, payload.encode(), json.dumps(headers)),
        ).fetchone()[0]

        message = {"id": str(message_id), "destination": args.destination, "key": key,
                   "headers": headers, "payload": payload, "committed": commit}
        if not commit:
            # Whatever goes wrong here (an exception, a crash) takes the order and its message
            # with it. psycopg.Rollback ends the block with a rollback and no error.
            raise psycopg.Rollback()
    return message


def main() -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=env("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--outbox-table", default=env("OUTBOX_TABLE", "outbox"))
    parser.add_argument("--orders-table", default=env("ORDERS_TABLE", "orders"))
    parser.add_argument("--destination", default=env("OUTBOX_DESTINATION", "orders"))
    args = parser.parse_args()

    # autocommit: no implicit transaction; each conn.transaction() block is one.
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " item TEXT NOT NULL, quantity INTEGER NOT NULL, placed_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ).format(table(args.orders_table))
        )
        for item, quantity, commit in [("book", 1, True), ("lamp", 2, True), ("kettle", 1, False)]:
            print(json.dumps(place_order(conn, args, item, quantity, commit)), flush=True)


if __name__ == "__main__":
    main()
