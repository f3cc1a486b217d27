//! Bad input at the storage level: rows damaged by hand or by a bug (random bytes in the
//! headers and other columns, invalid UTF-8, impossible numbers) are dead-lettered with a
//! clear error or published, never a panic, never a relay stuck on them, and the good messages
//! around them, of the same key, are published in order.

use std::time::Duration;

use outbox_core::{DeadLetterFilter, MemoryPublisher, MessageId, NewMessage, Relay, Store};
use outbox_sqlx::sqlx::{self, mysql::MySqlPoolOptions, postgres::PgPoolOptions};
use outbox_sqlx::{MySqlStore, PostgresStore, SqliteStore, StoreConfig};
use outbox_testkit::env::{or_skip, unique_name};
use outbox_testkit::relay::fast_config;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// A damaged value for one column.
#[derive(Clone, Debug)]
enum Damage {
    /// Bytes written as TEXT (SQLite keeps them as they are, invalid UTF-8 included).
    TextBytes(&'static str, Vec<u8>),
    /// A string.
    Text(&'static str, String),
    /// A number.
    Int(&'static str, i64),
}

impl Damage {
    fn column(&self) -> &'static str {
        match self {
            Damage::TextBytes(c, _) | Damage::Text(c, _) | Damage::Int(c, _) => c,
        }
    }
}

fn sqlite_damage() -> impl Strategy<Value = Damage> {
    let text_columns = prop_oneof![
        Just("headers"),
        Just("destination"),
        Just("key"),
        Just("last_error"),
        Just("payload"),
        Just("created_at"),
    ];
    prop_oneof![
        (
            text_columns.clone(),
            proptest::collection::vec(any::<u8>(), 0..48)
        )
            .prop_map(|(c, b)| Damage::TextBytes(c, b)),
        (text_columns, any::<String>()).prop_map(|(c, s)| Damage::Text(c, s)),
        (
            prop_oneof![Just("attempts"), Just("created_at"), Just("headers")],
            any::<i64>()
        )
            .prop_map(|(c, n)| Damage::Int(c, n)),
        // Headers that are JSON, but not an object of strings.
        prop_oneof![
            Just("[]"),
            Just("{\"a\":1}"),
            Just("{\"a\":null}"),
            Just("null"),
            Just("{\"a\":\"b\""),
            Just("{\"\\ud800\":\"x\"}"),
        ]
        .prop_map(|s| Damage::Text("headers", s.to_owned())),
    ]
}

/// Three messages of one key, the middle one damaged afterwards.
fn three(destination: &str, key: &str) -> Vec<NewMessage> {
    (0..3)
        .map(|i| {
            NewMessage::new(destination, format!("{key}/{i}"))
                .key(key)
                .header("n", i.to_string())
        })
        .collect()
}

/// Runs a relay on `store` until nothing is pending (bounded); the messages it published.
async fn drain<S: Store + Clone>(store: &S, publisher: &MemoryPublisher) -> Result<(), String> {
    let relay = Relay::builder(store.clone(), publisher.clone())
        .config(fast_config())
        .build()
        .map_err(|e| e.to_string())?;
    for _ in 0..100 {
        relay.run_once().await.map_err(|e| e.to_string())?;
        if store.stats().await.map_err(|e| e.to_string())?.pending == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "still pending after 100 batches: {:?}",
        store.stats().await
    ))
}

/// The property: the good messages arrive in order, the damaged one is published or
/// dead-lettered with an error saying what is wrong.
async fn judge<S: Store + Clone>(
    store: &S,
    publisher: &MemoryPublisher,
    ids: &[MessageId],
) -> Result<(), TestCaseError> {
    drain(store, publisher).await.map_err(TestCaseError::fail)?;
    let published: Vec<MessageId> = publisher.published().iter().map(|m| m.id).collect();
    let good: Vec<MessageId> = published
        .iter()
        .copied()
        .filter(|id| *id == ids[0] || *id == ids[2])
        .collect();
    prop_assert_eq!(
        good,
        vec![ids[0], ids[2]],
        "the good messages of the key arrive, in order"
    );
    if !published.contains(&ids[1]) {
        let dead = store
            .dead_letters(&DeadLetterFilter::all().ids([ids[1]]))
            .await;
        // Listing may fail for a row that cannot be decoded (see the test below); the row
        // must be dead, though, which stats count without decoding it.
        let stats = store
            .stats()
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(stats.dead >= 1, "the damaged message is dead-lettered");
        if let Ok(dead) = dead {
            let error = dead
                .first()
                .and_then(|d| d.message.last_error.clone())
                .unwrap_or_default();
            prop_assert!(
                error.contains("decode") || error.contains("column"),
                "the error says why: {error}"
            );
        }
    }
    Ok(())
}

async fn sqlite_store(dir: &std::path::Path) -> SqliteStore {
    let url = format!("sqlite://{}?mode=rwc", dir.join("bad.db").display());
    let store = SqliteStore::connect(StoreConfig::new().url(url).table("outbox"))
        .await
        .expect("sqlite");
    store.migrate().await.expect("migrate");
    store
}

async fn enqueue_sqlite(store: &SqliteStore, messages: Vec<NewMessage>) -> Vec<MessageId> {
    let mut tx = store
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    let ids = store
        .enqueue_batch(&mut *tx, messages)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    ids
}

async fn damage_sqlite(store: &SqliteStore, id: MessageId, damage: &Damage) {
    let column = damage.column();
    let sql = match damage {
        Damage::TextBytes(..) => {
            format!("UPDATE outbox SET \"{column}\" = CAST(? AS TEXT) WHERE id = ?")
        }
        _ => format!("UPDATE outbox SET \"{column}\" = ? WHERE id = ?"),
    };
    let query = sqlx::query(&sql);
    let query = match damage {
        Damage::TextBytes(_, bytes) => query.bind(bytes.clone()),
        Damage::Text(_, text) => query.bind(text.clone()),
        Damage::Int(_, n) => query.bind(*n),
    };
    query
        .bind(id.as_bytes().to_vec())
        .execute(store.pool())
        .await
        .expect("damage a row");
}

#[test]
fn damaged_sqlite_rows_are_dead_lettered_or_published() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = rt.block_on(sqlite_store(dir.path()));
    let mut runner = TestRunner::new(Config {
        cases: 40,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&sqlite_damage(), |damage| {
            rt.block_on(async {
                let key = unique_name("k");
                let ids = enqueue_sqlite(&store, three("orders", &key)).await;
                damage_sqlite(&store, ids[1], &damage).await;
                judge(&store, &MemoryPublisher::new(), &ids).await
            })
        })
        .unwrap_or_else(|err| panic!("{err}"));
}

/// Text values PostgreSQL and MySQL can store: anything but NUL.
fn server_damage() -> impl Strategy<Value = Damage> {
    let text = any::<String>().prop_map(|s| s.replace('\0', ""));
    prop_oneof![
        (
            prop_oneof![Just("headers"), Just("destination"), Just("key")],
            text
        )
            .prop_map(|(c, s)| Damage::Text(c, s)),
        prop_oneof![
            Just("[]"),
            Just("{\"a\":1}"),
            Just("{\"a\":\"b\""),
            Just("")
        ]
        .prop_map(|s| Damage::Text("headers", s.to_owned())),
        prop_oneof![
            Just(-1_i64),
            Just(i64::from(i32::MIN)),
            Just(i64::from(i32::MAX))
        ]
        .prop_map(|n| Damage::Int("attempts", n)),
    ]
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn damaged_postgres_rows_are_dead_lettered_or_published() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = outbox_chaos::db::postgres_url();
    let Some(pool) = or_skip(
        "PostgreSQL",
        rt.block_on(PgPoolOptions::new().max_connections(8).connect(&url)),
    ) else {
        return;
    };
    let table = unique_name("bad_rows");
    let store = PostgresStore::new(pool.clone(), StoreConfig::new().table(&table)).expect("store");
    rt.block_on(store.migrate()).expect("migrate");
    let result = runner(12).run(&server_damage(), |damage| {
        rt.block_on(async {
            let key = unique_name("k");
            let mut tx = pool.begin().await.expect("begin");
            let ids = store
                .enqueue_batch(&mut *tx, three("orders", &key))
                .await
                .expect("enqueue");
            tx.commit().await.expect("commit");
            let sql = format!(
                "UPDATE \"{table}\" SET \"{}\" = $1 WHERE id = $2",
                damage.column()
            );
            let query = sqlx::query(&sql);
            let query = match &damage {
                Damage::Text(_, text) => query.bind(text.clone()),
                Damage::Int(_, n) => query.bind(i32::try_from(*n).unwrap_or(-1)),
                Damage::TextBytes(..) => unreachable!("not generated for servers"),
            };
            query
                .bind(*ids[1].as_uuid())
                .execute(&pool)
                .await
                .expect("damage");
            judge(&store, &MemoryPublisher::new(), &ids).await
        })
    });
    // PostgreSQL refuses invalid UTF-8 in text columns: such a row cannot exist there.
    let refused = rt.block_on(
        sqlx::query(&format!(
            "UPDATE \"{table}\" SET headers = convert_from('\\xff41'::bytea, 'UTF8')"
        ))
        .execute(&pool),
    );
    rt.block_on(store.drop_tables()).expect("drop");
    result.unwrap_or_else(|err| panic!("{err}"));
    assert!(refused.is_err(), "PostgreSQL stores no invalid UTF-8");
}

#[test]
fn damaged_mysql_rows_are_dead_lettered_or_published() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = outbox_chaos::db::mysql_url();
    let Some(pool) = or_skip(
        "MySQL",
        rt.block_on(MySqlPoolOptions::new().max_connections(8).connect(&url)),
    ) else {
        return;
    };
    let table = unique_name("bad_rows");
    let store = MySqlStore::new(pool.clone(), StoreConfig::new().table(&table)).expect("store");
    rt.block_on(store.migrate()).expect("migrate");
    let result = runner(12).run(&server_damage(), |damage| {
        rt.block_on(async {
            let key = unique_name("k");
            let mut tx = pool.begin().await.expect("begin");
            let ids = store
                .enqueue_batch(&mut *tx, three("orders", &key))
                .await
                .expect("enqueue");
            tx.commit().await.expect("commit");
            let sql = format!(
                "UPDATE `{table}` SET `{}` = ? WHERE id = ?",
                damage.column()
            );
            let query = sqlx::query(&sql);
            let query = match &damage {
                Damage::Text(_, text) => query.bind(text.clone()),
                Damage::Int(_, n) => query.bind(*n),
                Damage::TextBytes(..) => unreachable!("not generated for servers"),
            };
            // Values MySQL refuses (too long for the column) cannot be stored: nothing to check.
            if query
                .bind(ids[1].as_bytes().to_vec())
                .execute(&pool)
                .await
                .is_err()
            {
                sqlx::query(&format!("DELETE FROM `{table}` WHERE id = ?"))
                    .bind(ids[1].as_bytes().to_vec())
                    .execute(&pool)
                    .await
                    .expect("delete");
                let ids = [ids[0], MessageId::new(), ids[2]];
                let publisher = MemoryPublisher::new();
                drain(&store, &publisher)
                    .await
                    .map_err(TestCaseError::fail)?;
                let got: Vec<MessageId> = publisher.published().iter().map(|m| m.id).collect();
                prop_assert_eq!(got, vec![ids[0], ids[2]]);
                return Ok(());
            }
            judge(&store, &MemoryPublisher::new(), &ids).await
        })
    });
    // Invalid UTF-8 in the headers: refused in strict mode, else stored mangled; either way the
    // relay gets past it.
    let invalid = rt.block_on(async {
        let mut conn = pool.acquire().await.expect("conn");
        sqlx::query("SET SESSION sql_mode = ''")
            .execute(&mut *conn)
            .await
            .expect("sql_mode");
        let mut tx = pool.begin().await.expect("begin");
        let ids = store
            .enqueue_batch(&mut *tx, three("orders", "invalid-utf8"))
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        let _ = sqlx::query(&format!(
            "UPDATE `{table}` SET headers = X'7B2261223A22FF22' WHERE id = ?"
        ))
        .bind(ids[1].as_bytes().to_vec())
        .execute(&mut *conn)
        .await;
        drop(conn);
        judge(&store, &MemoryPublisher::new(), &ids).await
    });
    rt.block_on(store.drop_tables()).expect("drop");
    result.unwrap_or_else(|err| panic!("{err}"));
    invalid.unwrap_or_else(|err| panic!("invalid UTF-8 in MySQL headers: {err}"));
}

/// Invalid UTF-8 in a header value, written at the storage level: the message is
/// dead-lettered with an error that says so, the key goes on.
#[tokio::test]
async fn invalid_utf8_in_sqlite_headers_is_a_dead_letter_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = sqlite_store(dir.path()).await;
    let ids = enqueue_sqlite(&store, three("orders", "k")).await;
    // {"n":"<0xff>"}
    let bytes = b"{\"n\":\"\xff\"}".to_vec();
    damage_sqlite(&store, ids[1], &Damage::TextBytes("headers", bytes)).await;
    let publisher = MemoryPublisher::new();
    drain(&store, &publisher).await.expect("drains");
    let got: Vec<MessageId> = publisher.published().iter().map(|m| m.id).collect();
    assert_eq!(got, vec![ids[0], ids[2]]);
    let dead = store
        .dead_letters(&DeadLetterFilter::all())
        .await
        .expect("dead letters are listed");
    assert_eq!(dead.len(), 1);
    let error = dead[0].message.last_error.clone().unwrap_or_default();
    assert!(error.contains("headers"), "{error}");
    assert_eq!(dead[0].message.id, ids[1]);
}

/// One dead letter whose destination cannot be decoded must not hide the others: operators
/// list dead letters to decide what to replay or purge.
#[tokio::test]
async fn one_undecodable_dead_letter_does_not_hide_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = sqlite_store(dir.path()).await;
    let ids = enqueue_sqlite(&store, three("orders", "k")).await;
    damage_sqlite(
        &store,
        ids[1],
        &Damage::TextBytes("destination", vec![0xff, 0xfe]),
    )
    .await;
    // And one ordinary dead letter: a message of another key failing for good.
    sqlx::query("UPDATE outbox SET destination = CAST(X'FF' AS TEXT) WHERE id = ?")
        .bind(ids[2].as_bytes().to_vec())
        .execute(store.pool())
        .await
        .expect("damage");
    let publisher = MemoryPublisher::new();
    drain(&store, &publisher).await.expect("drains");
    assert_eq!(store.stats().await.expect("stats").dead, 2);
    let listed = store.dead_letters(&DeadLetterFilter::all()).await;
    assert!(
        listed.as_ref().is_ok_and(|dead| dead.len() == 2),
        "every dead letter is listed (damaged columns shown as such): {listed:?}"
    );
}

/// A row whose id cannot be read (16 characters of text that are more than 16 bytes) can be
/// neither published nor dead-lettered by id: it must still not hold its key back for ever.
#[tokio::test]
async fn an_unreadable_id_does_not_hold_its_key_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = sqlite_store(dir.path()).await;
    let ids = enqueue_sqlite(&store, three("orders", "k")).await;
    sqlx::query("UPDATE outbox SET id = 'éééééééééééééééé' WHERE id = ?")
        .bind(ids[1].as_bytes().to_vec())
        .execute(store.pool())
        .await
        .expect("damage the id");
    let publisher = MemoryPublisher::new();
    let drained = drain(&store, &publisher).await;
    let got: Vec<MessageId> = publisher.published().iter().map(|m| m.id).collect();
    assert!(
        got.contains(&ids[2]),
        "the later message of the key is published: {got:?} ({drained:?})"
    );
}

/// The same row must not stay pending for ever either: it is re-leased at every lease
/// expiry, counted in the backlog for good, and never dead-lettered.
#[tokio::test]
async fn an_unreadable_id_does_not_stay_pending_for_ever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = sqlite_store(dir.path()).await;
    let ids = enqueue_sqlite(&store, three("orders", "k")).await;
    sqlx::query("UPDATE outbox SET id = 'éééééééééééééééé' WHERE id = ?")
        .bind(ids[1].as_bytes().to_vec())
        .execute(store.pool())
        .await
        .expect("damage the id");
    let drained = drain(&store, &MemoryPublisher::new()).await;
    assert!(
        drained.is_ok(),
        "the damaged row ends as a dead letter, not pending: {drained:?}"
    );
}
