//! The outbox table as a contract for writers in any language: a plain `INSERT` of destination,
//! key and payload (headers optional) is enough, the database filling in the rest as
//! `enqueue` would, partition included, and refusing the rows no relay could publish.

#![allow(unreachable_pub)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use outbox_core::{MessageId, PARTITIONS, RelayId, Store, partition_of};
use outbox_testkit::StoreHarness;
use uuid::Uuid;

/// How many keys are checked against `partition_of`.
const KEYS: usize = 10_000;

/// Keys of every kind: none (the id's partition), empty, ASCII, Cyrillic, CJK, emoji and
/// mixtures of them, up to 40 characters.
fn keys() -> Vec<Option<String>> {
    const ALPHABETS: [&str; 4] = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/ ",
        "ключзаказпривет",
        "注文鍵顧客東京",
        "🚀🎉😀👍🏽",
    ];
    let alphabets: Vec<Vec<char>> = ALPHABETS.iter().map(|a| a.chars().collect()).collect();
    let mut keys = vec![
        None,
        Some(String::new()),
        Some("ключ".into()),
        Some("🚀".into()),
    ];
    while keys.len() < KEYS {
        if fastrand::u8(..) < 20 {
            keys.push(None);
            continue;
        }
        let len = fastrand::usize(0..=40);
        let key = (0..len)
            .map(|_| {
                let alphabet = &alphabets[fastrand::usize(..alphabets.len())];
                alphabet[fastrand::usize(..alphabet.len())]
            })
            .collect();
        keys.push(Some(key));
    }
    keys
}

/// A row as a plain `INSERT` left it.
struct Stored {
    id: Vec<u8>,
    key: Option<String>,
    partition: i64,
    headers: String,
    fresh: bool,
}

/// Every stored row has `partition_of` its key (or id), an id of its own (a UUID v7 where
/// `v7`; SQLite's are 16 random bytes), `{}` headers and `available_at = created_at`
/// (`fresh`); and the keys are those written, in order.
fn check(written: &[Option<String>], stored: &[Stored], v7: bool) {
    assert_eq!(stored.len(), written.len(), "every row stored");
    let mut ids = HashSet::new();
    for (row, key) in stored.iter().zip(written) {
        assert_eq!(&row.key, key, "rows in the order written");
        let id = Uuid::from_slice(&row.id).expect("a 16-byte id");
        if v7 {
            assert_eq!(id.get_version_num(), 7, "a UUID v7: {id}");
        }
        assert!(ids.insert(id), "ids are unique: {id}");
        let expected = partition_of(row.key.as_deref(), &MessageId::from_uuid(id));
        assert_eq!(
            row.partition,
            i64::from(expected),
            "the partition of key {:?} (id {id})",
            row.key
        );
        assert_eq!(row.headers, "{}");
        assert!(row.fresh, "available as soon as created");
    }
}

/// The store claims the rows a plain `INSERT` wrote: messages with their keys and payloads,
/// none malformed.
async fn claimable<S: Store>(store: &S, written: &[Option<String>]) {
    let relay = RelayId::random();
    let all: Vec<u16> = (0..PARTITIONS).collect();
    store
        .acquire(&relay, &all, Duration::from_secs(60))
        .await
        .expect("acquire");
    let claim = store
        .claim(&relay, 500, Duration::from_secs(60))
        .await
        .expect("claim");
    assert!(claim.malformed.is_empty(), "{:?}", claim.malformed);
    assert!(!claim.messages.is_empty());
    let written: HashSet<Option<&str>> = written.iter().map(Option::as_deref).collect();
    for message in &claim.messages {
        assert!(written.contains(&message.key.as_deref()));
        assert_eq!(message.payload, b"p");
        assert_eq!(message.destination, "orders");
    }
}

/// Asserts that `result` failed with a message containing `why`.
fn refused<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, why: &str) {
    let err = result.expect_err(why);
    assert!(err.to_string().contains(why), "{why}: {err}");
}

/// The `INSERT`s of rows no relay could publish into the table `t` (quoted) of a database whose
/// identifier quote is `q` and whose literal for a payload is `payload`, each with the error
/// message `why` gives for its row: partition 64, partition -1, headers an array, a header
/// value not a string, headers not JSON, an empty destination.
fn stranded(
    t: &str,
    q: char,
    payload: &str,
    why: [&'static str; 6],
) -> Vec<(String, &'static str)> {
    let insert = |columns: &str, values: &str| {
        format!(
            "INSERT INTO {t} (destination, {q}key{q}, payload{columns}) \
             VALUES ('orders', 'k', {payload}{values})"
        )
    };
    let partition = format!(", {q}partition{q}");
    vec![
        (insert(&partition, ", 64"), why[0]),
        (insert(&partition, ", -1"), why[1]),
        (insert(", headers", ", '[1]'"), why[2]),
        (insert(", headers", ", '{\"a\": 1}'"), why[3]),
        (insert(", headers", ", 'not json'"), why[4]),
        (
            format!("INSERT INTO {t} (destination, payload) VALUES ('', {payload})"),
            why[5],
        ),
    ]
}

/// Checks that every statement of [`stranded`] fails with its message on `$pool`, and that
/// the table `$t` stayed empty.
macro_rules! refuses_stranded {
    ($pool:expr, $t:expr, $statements:expr) => {{
        for (statement, why) in $statements {
            refused(sqlx::query(&statement).execute($pool).await, why);
        }
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", $t))
            .fetch_one($pool)
            .await
            .expect("count");
        assert_eq!(count, 0, "nothing written");
    }};
}

/// Writes one row per key of `$written` with plain multi-row `INSERT`s on `$conn`: `$head` up
/// to `VALUES`, `$row` the values of a row, the key bound to its `?`.
macro_rules! insert_keys {
    ($conn:expr, $head:expr, $row:literal, $written:expr) => {
        for chunk in $written.chunks(1000) {
            let sql = format!("{} {}", $head, vec![$row; chunk.len()].join(", "));
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query.bind(key);
            }
            query.execute(&mut *$conn).await.expect("plain insert");
        }
    };
}

/// The body of a test that schema version 2 of `$h`'s tables, brought back to version 1 by
/// `$revert` (SQL), comes back by `migrate` without rebuilding the table (`$identity`, a query
/// of one integer that a rebuild changes, bound to the table's name), the rows written before
/// intact and claimed first, and a plain `INSERT` (`$insert`) working after.
macro_rules! upgraded_in_place {
    ($h:expr, $revert:expr, $identity:expr, $insert:expr, $latest:expr) => {{
        let h = $h;
        let pool = h.store.pool().clone();
        sqlx::raw_sql(&$revert)
            .execute(&pool)
            .await
            .expect("back to version 1");
        assert_eq!(h.store.schema_version().await.expect("version"), 1);
        let messages = (0..3).map(|i| outbox_core::NewMessage::new("orders", format!("{i}")));
        let ids = h.enqueue(messages.collect()).await.expect("enqueue");
        let identity = || {
            sqlx::query_scalar::<_, i64>($identity)
                .bind(&h.table)
                .fetch_one(&pool)
        };
        let before = identity().await.expect("identity");
        h.store.migrate().await.expect("upgrade");
        assert_eq!(h.store.schema_version().await.expect("version"), $latest);
        assert_eq!(identity().await.expect("identity"), before, "not rebuilt");
        sqlx::query(&$insert)
            .execute(&pool)
            .await
            .expect("a plain insert after the upgrade");
        let relay = RelayId::random();
        let all: Vec<u16> = (0..PARTITIONS).collect();
        let lease = Duration::from_secs(60);
        h.store.acquire(&relay, &all, lease).await.expect("acquire");
        let claim = h.store.claim(&relay, 10, lease).await.expect("claim");
        let claimed: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
        assert_eq!(claimed.len(), 4);
        assert_eq!(claimed[..3], ids[..], "the old rows, first and intact");
        h.teardown().await;
    }};
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use common::pg::PgHarness;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_inserts_are_completed_as_enqueue_would() {
        let Some(h) = PgHarness::new().await else {
            return;
        };
        let pool = h.store.pool().clone();
        let written = keys();
        sqlx::query(&format!(
            "INSERT INTO {} (destination, \"key\", payload) \
             SELECT 'orders', k, 'p' FROM unnest($1::text[]) WITH ORDINALITY AS u(k, n) ORDER BY n",
            h.quoted()
        ))
        .bind(&written)
        .execute(&pool)
        .await
        .expect("plain insert");
        let rows: Vec<(Uuid, Option<String>, i16, String, bool)> = sqlx::query_as(&format!(
            "SELECT id, \"key\", \"partition\", headers, available_at = created_at FROM {} \
             ORDER BY seq",
            h.quoted()
        ))
        .fetch_all(&pool)
        .await
        .expect("read back");
        let stored: Vec<Stored> = rows
            .into_iter()
            .map(|(id, key, partition, headers, fresh)| Stored {
                id: id.as_bytes().to_vec(),
                key,
                partition: partition.into(),
                headers,
                fresh,
            })
            .collect();
        check(&written, &stored, true);
        claimable(&h.store, &written).await;
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_that_would_strand_are_refused() {
        let Some(h) = PgHarness::new().await else {
            return;
        };
        let pool = h.store.pool().clone();
        let t = h.quoted();
        let statements = stranded(
            &t,
            '"',
            "'p'",
            [
                "partition 64 is not between 0 and 63",
                "partition -1 is not between 0 and 63",
                "headers must be a JSON object",
                "header values must be JSON strings",
                "invalid input syntax for type json",
                "destination must not be empty",
            ],
        );
        refuses_stranded!(&pool, &t, statements);
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plain_insert_wakes_a_listening_relay_on_commit() {
        let Some(h) = PgHarness::new().await else {
            return;
        };
        let store = h.store();
        let (wakeup, listening) = common::pg::listening(&store).await;
        let mut tx = store.pool().begin().await.expect("begin");
        sqlx::query(&format!(
            "INSERT INTO {} (destination, payload) VALUES ('orders', 'p')",
            h.quoted()
        ))
        .execute(&mut *tx)
        .await
        .expect("plain insert");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), wakeup.woken())
                .await
                .is_err(),
            "nothing before the commit"
        );
        tx.commit().await.expect("commit");
        tokio::time::timeout(Duration::from_secs(5), wakeup.woken())
            .await
            .expect("woken by the commit");
        listening.abort();
        h.teardown().await;
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use chrono::NaiveDateTime;
    use common::my::MyHarness;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_inserts_are_completed_as_enqueue_would() {
        let Some(h) = MyHarness::new().await else {
            return;
        };
        let pool = h.store.pool().clone();
        let t = &h.table;
        // A session far from UTC: the database's times are UTC all the same.
        let mut conn = pool.acquire().await.expect("connection");
        sqlx::query("SET time_zone = '+05:00'")
            .execute(&mut *conn)
            .await
            .expect("time zone");
        let written = keys();
        let head = format!("INSERT INTO `{t}` (destination, `key`, payload) VALUES");
        insert_keys!(conn, head, "('orders', ?, 'p')", written);
        /// id, key, partition, headers, available_at = created_at, created_at.
        type Row = (Vec<u8>, Option<Vec<u8>>, i16, Vec<u8>, i64, NaiveDateTime);
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT id, `key`, `partition`, headers, available_at = created_at, created_at \
                 FROM `{t}` ORDER BY seq"
        ))
        .fetch_all(&mut *conn)
        .await
        .expect("read back");
        let now = chrono::Utc::now().naive_utc();
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8");
        let stored: Vec<Stored> = rows
            .into_iter()
            .map(|(id, key, partition, headers, fresh, created_at)| {
                let skew = (now - created_at).num_seconds().abs();
                assert!(skew < 60, "created_at is UTC: {created_at} against {now}");
                Stored {
                    id,
                    key: key.map(text),
                    partition: partition.into(),
                    headers: text(headers),
                    fresh: fresh == 1,
                }
            })
            .collect();
        check(&written, &stored, true);
        drop(conn);
        claimable(&h.store, &written).await;
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_that_would_strand_are_refused() {
        let Some(h) = MyHarness::new().await else {
            return;
        };
        let pool = h.store.pool().clone();
        let quoted = format!("`{}`", h.table);
        let statements = stranded(
            &quoted,
            '`',
            "'p'",
            [
                "partition 64 is not between 0 and 63",
                "partition -1 is not between 0 and 63",
                "headers must be a JSON object",
                "header values must be JSON strings",
                "headers are not valid JSON",
                "destination must not be empty",
            ],
        );
        refuses_stranded!(&pool, &quoted, statements);
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_1_table_is_upgraded_in_place() {
        let Some(h) = MyHarness::new().await else {
            return;
        };
        let t = h.table.clone();
        upgraded_in_place!(
            h,
            format!("DROP TRIGGER `{t}_fill`; DELETE FROM `{t}_schema` WHERE version >= 2"),
            "SELECT CAST(TABLE_ID AS SIGNED) FROM information_schema.INNODB_SYS_TABLES \
             WHERE NAME = CONCAT(DATABASE(), '/', ?)",
            format!("INSERT INTO `{t}` (destination, payload) VALUES ('orders', 'p')"),
            outbox_sqlx::MySqlStore::SCHEMA_VERSION
        );
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use common::lite::LiteHarness;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_inserts_are_completed_as_enqueue_would() {
        let h = LiteHarness::new().await;
        let pool = h.store.pool().clone();
        let t = &h.table;
        let written = keys();
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
        let head = format!("INSERT INTO \"{t}\" (destination, \"key\", payload) VALUES");
        insert_keys!(tx, head, "('orders', ?, x'70')", written);
        tx.commit().await.expect("commit");
        /// id, key, partition, headers, available_at = created_at.
        type Row = (Vec<u8>, Option<String>, i64, String, bool);
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT id, \"key\", \"partition\", headers, available_at = created_at FROM \"{t}\" \
             ORDER BY seq"
        ))
        .fetch_all(&pool)
        .await
        .expect("read back");
        let stored: Vec<Stored> = rows
            .into_iter()
            .map(|(id, key, partition, headers, fresh)| Stored {
                id,
                key,
                partition,
                headers,
                fresh,
            })
            .collect();
        check(&written, &stored, false);
        claimable(&h.store, &written).await;
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_that_would_strand_are_refused() {
        let h = LiteHarness::new().await;
        let pool = h.store.pool().clone();
        let quoted = format!("\"{}\"", h.table);
        let statements = stranded(
            &quoted,
            '"',
            "x'70'",
            [
                "partition must be an integer between 0 and 63",
                "partition must be an integer between 0 and 63",
                "headers must be a JSON object",
                "headers must be a JSON object of strings",
                "headers must be a JSON object",
                "destination must not be empty",
            ],
        );
        refuses_stranded!(&pool, &quoted, statements);
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_1_table_is_upgraded_in_place() {
        let h = LiteHarness::new().await;
        let t = h.table.clone();
        upgraded_in_place!(
            h,
            format!(
                "DROP TRIGGER \"{t}_fill\"; DROP TRIGGER \"{t}_check\"; \
                 DELETE FROM \"{t}_schema\" WHERE version >= 2"
            ),
            "SELECT rootpage FROM sqlite_master WHERE name = ?",
            format!("INSERT INTO \"{t}\" (destination, payload) VALUES ('orders', x'70')"),
            outbox_sqlx::SqliteStore::SCHEMA_VERSION
        );
    }
}
