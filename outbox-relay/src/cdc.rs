//! The log relay (`[cdc]`): new messages read from PostgreSQL's log by a [`LogRelay`], beside
//! the polling relay, which claims only what the log relay hands to the table; the slot and
//! publication in `migrate`, `check` and `status`; the slot's lag in `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{DynPublisher, LogRelay, RelayError};
use outbox_pg_cdc::{CdcAdmin, CdcConfig, CdcError, PgOutboxLog, SlotStatus};
use outbox_sqlx::PostgresStore;
use tracing::{info, warn};

use crate::config::{Config, redact};
use crate::http::Phase;

/// Bytes of WAL the slot holds back: from its confirmed position to the end of the WAL.
pub(crate) const SLOT_LAG: &str = "outbox_cdc_slot_lag_bytes";
/// The slot's confirmed position, as a number (the LSN's 64 bits).
pub(crate) const SLOT_CONFIRMED: &str = "outbox_cdc_slot_confirmed_lsn";

/// The log relay's setup for `config`'s `[cdc]` section, when it has one.
pub(crate) fn section(config: &Config) -> Option<&CdcConfig> {
    config.cdc.as_ref()
}

/// A description of the slot for logs, without secrets.
pub(crate) fn describe(cdc: &CdcConfig) -> String {
    format!(
        "slot {} publication {} on {}",
        cdc.slot,
        cdc.publication,
        redact(&cdc.url)
    )
}

async fn admin(cdc: &CdcConfig) -> Result<CdcAdmin, CdcError> {
    CdcAdmin::connect(cdc.clone()).await
}

/// `migrate`: the publication and the slot, when missing.
pub(crate) async fn migrate(cdc: &CdcConfig) -> Result<(), CdcError> {
    let admin = admin(cdc).await?;
    admin.check().await?;
    admin.ensure().await
}

/// `check`: what the log relay needs of the server, and the slot.
pub(crate) async fn check(cdc: &CdcConfig) -> Result<SlotStatus, CdcError> {
    let admin = admin(cdc).await?;
    admin.check().await?;
    admin.slot_status().await
}

/// `status`: the slot's position and lag.
pub(crate) async fn status(cdc: &CdcConfig) -> Result<SlotStatus, CdcError> {
    admin(cdc).await?.slot_status().await
}

/// Opens the log source, waiting while the slot is in use (another relay streams it: this one
/// is its standby) or the server is unreachable. `None` when `stopped` came first.
pub(crate) async fn connect(
    cdc: &CdcConfig,
    store: PostgresStore,
    phase: &Phase,
    probe_max: Duration,
    stopped: impl std::future::Future<Output = ()>,
) -> Result<Option<PgOutboxLog>, CdcError> {
    tokio::pin!(stopped);
    let mut wait = Duration::from_millis(100);
    loop {
        match PgOutboxLog::connect(cdc.clone(), store.clone()).await {
            Ok(source) => return Ok(Some(source)),
            Err(err) if err.is_transient() => {
                let reason = format!("log source ({}): {err}", describe(cdc));
                warn!(error = %err, retry_in = ?wait, "the log source cannot start yet; waiting");
                phase.waiting(&reason);
            }
            Err(err) => return Err(err),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut stopped => return Ok(None),
        }
        wait = (wait * 2).min(probe_max);
    }
}

/// Runs the log relay until `stopped`, exporting the slot's lag every `interval`.
pub(crate) async fn run(
    relay: LogRelay<PgOutboxLog, Arc<dyn DynPublisher>>,
    cdc: &CdcConfig,
    interval: Duration,
    stopped: impl std::future::Future<Output = ()> + Send,
) -> Result<(), RelayError> {
    metrics::describe_gauge!(
        SLOT_LAG,
        metrics::Unit::Bytes,
        "WAL the log relay's slot holds back"
    );
    metrics::describe_gauge!(SLOT_CONFIRMED, "The log relay's slot's confirmed position");
    info!(source = %describe(cdc), "log relay starting");
    let lag = async {
        let admin = match admin(cdc).await {
            Ok(admin) => admin,
            Err(err) => {
                warn!(error = %err, "cannot read the slot's lag; /metrics goes without it");
                return std::future::pending().await;
            }
        };
        loop {
            match admin.slot_status().await {
                Ok(status) => {
                    metrics::gauge!(SLOT_LAG).set(status.lag_bytes as f64);
                    metrics::gauge!(SLOT_CONFIRMED).set(status.confirmed_flush_lsn.as_u64() as f64);
                }
                Err(err) => warn!(error = %err, "could not read the slot's lag"),
            }
            tokio::time::sleep(interval).await;
        }
    };
    tokio::select! {
        res = relay.run(stopped) => res,
        () = lag => Ok(()),
    }
}
