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

/// Every stored row has `partition_of` its key (or id), a UUID v7 of its own, `{}` headers and
/// `available_at = created_at` (`fresh`); and the keys are those written, in order.
fn check(written: &[Option<String>], stored: &[Stored]) {
    assert_eq!(stored.len(), written.len(), "every row stored");
    let mut ids = HashSet::new();
    for (row, key) in stored.iter().zip(written) {
        assert_eq!(&row.key, key, "rows in the order written");
        let id = Uuid::from_slice(&row.id).expect("a 16-byte id");
        assert_eq!(id.get_version_num(), 7, "a UUID v7: {id}");
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

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use common::pg::PgHarness;
    use outbox_core::Wakeup;

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
        check(&written, &stored);
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
        let insert = |columns: &str, values: &str| {
            format!(
                "INSERT INTO {t} (destination, \"key\", payload{columns}) VALUES ('orders', 'k', 'p'{values})"
            )
        };
        for (columns, values, why) in [
            (
                ", \"partition\"",
                ", 64",
                "partition 64 is not between 0 and 63",
            ),
            (
                ", \"partition\"",
                ", -1",
                "partition -1 is not between 0 and 63",
            ),
            (", headers", ", '[1]'", "headers must be a JSON object"),
            (
                ", headers",
                ", '{\"a\": 1}'",
                "header values must be JSON strings",
            ),
            (
                ", headers",
                ", 'not json'",
                "invalid input syntax for type json",
            ),
        ] {
            refused(
                sqlx::query(&insert(columns, values)).execute(&pool).await,
                why,
            );
        }
        refused(
            sqlx::query(&format!(
                "INSERT INTO {t} (destination, payload) VALUES ('', 'p')"
            ))
            .execute(&pool)
            .await,
            "destination must not be empty",
        );
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(count, 0);
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plain_insert_wakes_a_listening_relay_on_commit() {
        let Some(h) = PgHarness::new().await else {
            return;
        };
        let store = h.store();
        let wakeup = Wakeup::new();
        let listening = tokio::spawn({
            let (store, wakeup) = (store.clone(), wakeup.clone());
            async move { store.listen(wakeup).await }
        });
        tokio::time::timeout(Duration::from_secs(5), wakeup.woken())
            .await
            .expect("woken once listening");
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
        for chunk in written.chunks(1000) {
            let rows = vec!["('orders', ?, 'p')"; chunk.len()].join(", ");
            let sql = format!("INSERT INTO `{t}` (destination, `key`, payload) VALUES {rows}");
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query.bind(key);
            }
            query.execute(&mut *conn).await.expect("plain insert");
        }
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
        check(&written, &stored);
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
        let t = &h.table;
        let insert = |columns: &str, values: &str| {
            format!(
                "INSERT INTO `{t}` (destination, `key`, payload{columns}) VALUES ('orders', 'k', 'p'{values})"
            )
        };
        for (columns, values, why) in [
            (
                ", `partition`",
                ", 64",
                "partition 64 is not between 0 and 63",
            ),
            (
                ", `partition`",
                ", -1",
                "partition -1 is not between 0 and 63",
            ),
            (", headers", ", '[1]'", "headers must be a JSON object"),
            (
                ", headers",
                ", '{\"a\": 1}'",
                "header values must be JSON strings",
            ),
            (", headers", ", 'not json'", "headers are not valid JSON"),
        ] {
            refused(
                sqlx::query(&insert(columns, values)).execute(&pool).await,
                why,
            );
        }
        refused(
            sqlx::query(&format!(
                "INSERT INTO `{t}` (destination, payload) VALUES ('', 'p')"
            ))
            .execute(&pool)
            .await,
            "destination must not be empty",
        );
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM `{t}`"))
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(count, 0);
        h.teardown().await;
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
        for chunk in written.chunks(1000) {
            let rows = vec!["('orders', ?, x'70')"; chunk.len()].join(", ");
            let sql = format!("INSERT INTO \"{t}\" (destination, \"key\", payload) VALUES {rows}");
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query.bind(key);
            }
            query.execute(&mut *tx).await.expect("plain insert");
        }
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
        check(&written, &stored);
        claimable(&h.store, &written).await;
        h.teardown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_that_would_strand_are_refused() {
        let h = LiteHarness::new().await;
        let pool = h.store.pool().clone();
        let t = &h.table;
        let insert = |columns: &str, values: &str| {
            format!(
                "INSERT INTO \"{t}\" (destination, \"key\", payload{columns}) VALUES ('orders', 'k', x'70'{values})"
            )
        };
        for (columns, values, why) in [
            (
                ", \"partition\"",
                ", 64",
                "partition must be an integer between 0 and 63",
            ),
            (
                ", \"partition\"",
                ", -1",
                "partition must be an integer between 0 and 63",
            ),
            (", headers", ", '[1]'", "headers must be a JSON object"),
            (
                ", headers",
                ", '{\"a\": 1}'",
                "headers must be a JSON object of strings",
            ),
            (", headers", ", 'not json'", "headers must be a JSON object"),
        ] {
            refused(
                sqlx::query(&insert(columns, values)).execute(&pool).await,
                why,
            );
        }
        refused(
            sqlx::query(&format!(
                "INSERT INTO \"{t}\" (destination, payload) VALUES ('', x'70')"
            ))
            .execute(&pool)
            .await,
            "destination must not be empty",
        );
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{t}\""))
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(count, 0);
        h.teardown().await;
    }
}
