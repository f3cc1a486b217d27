//! The chaos harness on every combination, short profile (`OUTBOX_CHAOS_PROFILE=long` for the
//! soak): the guarantee must hold through killed relays; cut, refused, black-holed and restarted
//! brokers; a broker away for far longer than the relays' retry budget; killed and black-holed
//! database connections and restarted database servers; with producers that serialize each
//! key's transactions and producers that do not. No message may be lost, invented, reordered
//! against the order promise or dead-lettered. The `postgres_cdc_*` runs do it with the log
//! relay (`[cdc]`: a logical replication slot, one relay streaming it and two standing by),
//! whose order promise is commit order.

use outbox_chaos::{Combination, Options, Profile, run, seed_from_env};
use outbox_testkit::env::or_skip;

/// Runs are heavy (a broker, three relay processes, producers): one at a time, so that a run
/// on this two-core machine measures faults rather than starvation.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn chaos(combination: Combination) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let options = Options {
        relay_bin: env!("CARGO_BIN_EXE_chaos-relay").into(),
        profile: Profile::from_env(),
        seed: seed_from_env(),
    };
    let Some(report) = or_skip(combination.servers(), run(combination, &options).await) else {
        return;
    };
    println!("{report}");
    println!("{}", report.markdown_row());
    assert!(report.passed(), "{report}");
    assert!(
        report.verdict.committed > 0,
        "the producers committed nothing: {report}"
    );
    assert!(report.fault_total() > 0, "no fault was injected: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_nats_survives_chaos() {
    chaos(Combination::PostgresNats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_kafka_survives_chaos() {
    chaos(Combination::PostgresKafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_to_amqp_survives_chaos() {
    chaos(Combination::MysqlAmqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_nats_survives_chaos() {
    chaos(Combination::SqliteNats).await;
}

/// Issue #17: the log relay reads committed messages from a logical replication slot on a
/// private cluster (`wal_level = logical`; `outbox-relay migrate` creates the slot), one relay
/// process streams it while the other two stand by, and the polling relay beside it publishes
/// what the log relay hands to the table. Through the same faults, a key's first deliveries
/// must come in commit order, also from producers that do not serialize their transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cdc_to_nats_survives_chaos() {
    chaos(Combination::PostgresCdcNats).await;
}

/// As `postgres_cdc_to_nats_survives_chaos`, to RabbitMQ (the shared server, a queue of the
/// run behind the fault proxy), which does not deduplicate: every republish shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cdc_to_amqp_survives_chaos() {
    chaos(Combination::PostgresCdcAmqp).await;
}
