// Places orders on PostgreSQL with `pg`, each announced by an outbox message written in the
// same transaction: one plain INSERT into the outbox table, which `outbox-relay run` publishes.
// The last order is rolled back, and its message with it: it is never published.
//
//   node enqueue_postgres.js [DATABASE_URL]
//
// Defaults come from DATABASE_URL, OUTBOX_TABLE (outbox), ORDERS_TABLE (orders) and
// OUTBOX_DESTINATION (orders). The outbox table must exist: `outbox-relay migrate`, or the script
// `outbox-relay schema --dialect postgres` prints. Prints one JSON line per message.
import { randomUUID } from 'node:crypto';
import pg from 'pg';

const url = process.argv[2] ?? process.env.DATABASE_URL ?? 'postgresql://postgres@127.0.0.1:5432/test';
const destination = process.env.OUTBOX_DESTINATION ?? 'orders';
// "schema.table" or "table", quoted.
const table = (name) => name.split('.').map((part) => pg.escapeIdentifier(part)).join('.');
const outbox = table(process.env.OUTBOX_TABLE ?? 'outbox');
const orders = table(process.env.ORDERS_TABLE ?? 'orders');

async function placeOrder(client, item, quantity, commit = true) {
  await client.query('BEGIN');
  try {
    const { rows: [order] } = await client.query(
      `INSERT INTO ${orders} (item, quantity) VALUES ($1, $2) RETURNING id`, [item, quantity]);

    const key = `order-${order.id}`; // messages of one key are published in enqueue order
    const payload = JSON.stringify({ order_id: order.id, item, quantity });
    const headers = { type: 'OrderPlaced', 'content-type': 'application/json', trace: randomUUID() };
    // The database fills in the id (a UUID v7), the partition and the timestamps.
    const { rows: [row] } = await client.query(
      `INSERT INTO ${outbox} (destination, "key", payload, headers) VALUES ($1, $2, $3, $4) RETURNING id`,
      [destination, key, Buffer.from(payload), JSON.stringify(headers)]);

    // A ROLLBACK (here on purpose, or below on any error) takes the order and its message.
    await client.query(commit ? 'COMMIT' : 'ROLLBACK');
    return { id: row.id, destination, key, headers, payload, committed: commit };
  } catch (err) {
    await client.query('ROLLBACK');
    throw err;
  }
}

const client = new pg.Client({ connectionString: url });
await client.connect();
try {
  await client.query(`CREATE TABLE IF NOT EXISTS ${orders} (id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item TEXT NOT NULL, quantity INTEGER NOT NULL, placed_at TIMESTAMPTZ NOT NULL DEFAULT now())`);
  for (const [item, quantity, commit] of [['book', 1, true], ['lamp', 2, true], ['kettle', 1, false]]) {
    console.log(JSON.stringify(await placeOrder(client, item, quantity, commit)));
  }
} finally {
  await client.end();
}
