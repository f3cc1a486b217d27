#!/usr/bin/env python3
"""Places orders on MySQL or MariaDB with PyMySQL, each announced by an outbox message written in
the same transaction: one plain INSERT into the outbox table, which `outbox-relay run`
publishes. The last order is rolled back, and its message with it: it is never published.

    python enqueue_mysql.py [--url URL] [--outbox-table T] [--orders-table T] [--destination D]

Defaults come from DATABASE_URL (mysql://user:password@host:port/database), OUTBOX_TABLE
(outbox), ORDERS_TABLE (orders) and OUTBOX_DESTINATION (orders). The outbox table must exist:
`outbox-relay migrate`, or the script `outbox-relay schema --dialect mysql` prints. Prints one
JSON line per message; "id" is null where the database made the id (MySQL cannot return it).
"""

import argparse
import json
import os
import uuid
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

import pymysql


def connect(url: str) -> pymysql.Connection:
    u = urlsplit(url)
    return pymysql.connect(host=u.hostname or "127.0.0.1", port=u.port or 3306,
                           user=unquote(u.username or "root"), password=unquote(u.password or ""),
                           database=u.path.lstrip("/") or None, charset="utf8mb4", autocommit=False)


def quoted(name: str) -> str:
    return ".".join(f"`{part}`" for part in name.split("."))  # "database.table" or "table"


@contextmanager
def transaction(conn):
    conn.begin()
    try:
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


class Declined(Exception):
    """A business rule failed after the order and its message were written."""


def place_order(conn, args, item: str, quantity: int, supply_id: bool, commit: bool = True) -> dict:
    with transaction(conn) as cur:
        cur.execute(f"INSERT INTO {quoted(args.orders_table)} (item, quantity) VALUES (%s, %s)", (item, quantity))
        order_id = cur.lastrowid

        key = f"order-{order_id}"  # messages of one key are published in enqueue order
        payload = json.dumps({"order_id": order_id, "item": item, "quantity": quantity})
        headers = {"type": "OrderPlaced", "content-type": "application/json", "trace": uuid.uuid4().hex}
        if supply_id:
            # An id of our own (16 big-endian bytes) tells us the message id without a query.
            message_id = uuid.uuid4()
            cur.execute(
                f"INSERT INTO {quoted(args.outbox_table)} (id, destination, `key`, payload, headers)"
                " VALUES (%s, %s, %s, %s, %s)",
                (message_id.bytes, args.destination, key, payload.encode(), json.dumps(headers)),
            )
        else:
            # The database fills in the id (a UUID v7), the partition and the timestamps.
            message_id = None
            cur.execute(
                f"INSERT INTO {quoted(args.outbox_table)} (destination, `key`, payload, headers)"
                " VALUES (%s, %s, %s, %s)",
                (args.destination, key, payload.encode(), json.dumps(headers)),
            )

        message = {"id": message_id and str(message_id), "destination": args.destination, "key": key,
                   "headers": headers, "payload": payload, "committed": commit}
        if not commit:
            raise Declined(message)  # rolls back the order and its message together
    return message


def main() -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=env("DATABASE_URL", "mysql://root@127.0.0.1:3306/test"))
    parser.add_argument("--outbox-table", default=env("OUTBOX_TABLE", "outbox"))
    parser.add_argument("--orders-table", default=env("ORDERS_TABLE", "orders"))
    parser.add_argument("--destination", default=env("OUTBOX_DESTINATION", "orders"))
    args = parser.parse_args()

    conn = connect(args.url)
    with conn, conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted(args.orders_table)} (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " item VARCHAR(200) NOT NULL, quantity INT NOT NULL,"
            " placed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE = InnoDB"
        )
        for item, quantity, supply_id in [("book", 1, False), ("lamp", 2, True)]:
            print(json.dumps(place_order(conn, args, item, quantity, supply_id)), flush=True)
        try:
            place_order(conn, args, "kettle", 1, supply_id=True, commit=False)
        except Declined as declined:
            print(json.dumps(declined.args[0]), flush=True)


if __name__ == "__main__":
    main()
