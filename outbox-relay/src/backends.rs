//! Builds the configured store and publisher behind their dyn-compatible traits.

use std::sync::Arc;

use outbox_core::{DynPublisher, DynStore, JsonLinesPublisher, StoreError};

use crate::config::{PublisherConfig, StoreKind};

/// The configured store.
#[derive(Clone)]
pub(crate) enum AnyStore {
    #[cfg(feature = "store-postgres")]
    Postgres(outbox_sqlx::PostgresStore),
    #[cfg(feature = "store-mysql")]
    MySql(outbox_sqlx::MySqlStore),
    #[cfg(feature = "store-sqlite")]
    Sqlite(outbox_sqlx::SqliteStore),
}

impl AnyStore {
    /// Connects to the database of `config.url`.
    pub(crate) async fn connect(config: &outbox_sqlx::StoreConfig) -> Result<Self, StoreError> {
        let url = config.url.as_deref().unwrap_or_default();
        let kind = StoreKind::from_url(url)
            .map_err(|reason| StoreError::new(outbox_core::StoreErrorKind::Config, reason))?;
        let config = config.clone();
        match kind {
            #[cfg(feature = "store-postgres")]
            StoreKind::Postgres => Ok(AnyStore::Postgres(
                outbox_sqlx::PostgresStore::connect(config).await?,
            )),
            #[cfg(feature = "store-mysql")]
            StoreKind::Mysql => Ok(AnyStore::MySql(
                outbox_sqlx::MySqlStore::connect(config).await?,
            )),
            #[cfg(feature = "store-sqlite")]
            StoreKind::Sqlite => Ok(AnyStore::Sqlite(
                outbox_sqlx::SqliteStore::connect(config).await?,
            )),
            #[allow(unreachable_patterns)]
            _ => Err(StoreError::new(
                outbox_core::StoreErrorKind::Config,
                "store not built in",
            )),
        }
    }

    /// The SQL that creates the outbox tables of `config` on a `kind` database, or upgrades
    /// them from schema version `from`.
    pub(crate) fn schema_script(
        kind: StoreKind,
        config: &outbox_sqlx::StoreConfig,
        from: i32,
    ) -> Result<String, StoreError> {
        match kind {
            #[cfg(feature = "store-postgres")]
            StoreKind::Postgres => outbox_sqlx::PostgresStore::schema_script(config, from),
            #[cfg(feature = "store-mysql")]
            StoreKind::Mysql => outbox_sqlx::MySqlStore::schema_script(config, from),
            #[cfg(feature = "store-sqlite")]
            StoreKind::Sqlite => outbox_sqlx::SqliteStore::schema_script(config, from),
            #[allow(unreachable_patterns)]
            _ => Err(StoreError::new(
                outbox_core::StoreErrorKind::Config,
                "store not built in",
            )),
        }
    }

    /// The schema version of the outbox tables, and the one this release migrates to.
    pub(crate) async fn schema_versions(&self) -> Result<(i32, i32), StoreError> {
        match self {
            #[cfg(feature = "store-postgres")]
            AnyStore::Postgres(store) => Ok((
                store.schema_version().await?,
                outbox_sqlx::PostgresStore::SCHEMA_VERSION,
            )),
            #[cfg(feature = "store-mysql")]
            AnyStore::MySql(store) => Ok((
                store.schema_version().await?,
                outbox_sqlx::MySqlStore::SCHEMA_VERSION,
            )),
            #[cfg(feature = "store-sqlite")]
            AnyStore::Sqlite(store) => Ok((
                store.schema_version().await?,
                outbox_sqlx::SqliteStore::SCHEMA_VERSION,
            )),
        }
    }

    /// Creates or upgrades the outbox tables.
    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "store-postgres")]
            AnyStore::Postgres(store) => store.migrate().await,
            #[cfg(feature = "store-mysql")]
            AnyStore::MySql(store) => store.migrate().await,
            #[cfg(feature = "store-sqlite")]
            AnyStore::Sqlite(store) => store.migrate().await,
        }
    }

    /// The PostgreSQL store, when it is one.
    #[cfg(feature = "cdc-postgres")]
    pub(crate) fn postgres(&self) -> Option<outbox_sqlx::PostgresStore> {
        match self {
            AnyStore::Postgres(store) => Some(store.clone()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The store behind the dyn-compatible trait.
    pub(crate) fn into_dyn(self) -> Arc<dyn DynStore> {
        match self {
            #[cfg(feature = "store-postgres")]
            AnyStore::Postgres(store) => Arc::new(store),
            #[cfg(feature = "store-mysql")]
            AnyStore::MySql(store) => Arc::new(store),
            #[cfg(feature = "store-sqlite")]
            AnyStore::Sqlite(store) => Arc::new(store),
        }
    }
}

/// A publisher that could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[error("publisher ({kind}): {message}")]
pub(crate) struct PublisherBuildError {
    kind: &'static str,
    message: String,
}

/// Builds the configured publisher. Connections are made lazily or retried by the publishers
/// themselves, so an unreachable broker does not stop the relay from starting.
pub(crate) async fn publisher(
    config: &PublisherConfig,
) -> Result<Arc<dyn DynPublisher>, PublisherBuildError> {
    let kind = config.kind();
    let fail = |err: &dyn std::fmt::Display| PublisherBuildError {
        kind,
        message: err.to_string(),
    };
    Ok(match config {
        PublisherConfig::Stdout => Arc::new(JsonLinesPublisher::stdout()),
        #[cfg(feature = "broker-kafka")]
        PublisherConfig::Kafka(config) => Arc::new(
            outbox_kafka::KafkaPublisher::new(config.clone())
                .await
                .map_err(|e| fail(&e))?,
        ),
        #[cfg(feature = "broker-amqp")]
        PublisherConfig::Amqp(config) => Arc::new(
            outbox_amqp::AmqpPublisher::new(config.clone())
                .await
                .map_err(|e| fail(&e))?,
        ),
        #[cfg(feature = "broker-nats")]
        PublisherConfig::Nats(config) => Arc::new(
            outbox_nats::NatsPublisher::new(config.clone())
                .await
                .map_err(|e| fail(&e))?,
        ),
    })
}

/// A one-line description of the broker for logs and `check`, without secrets.
pub(crate) fn describe_publisher(config: &PublisherConfig) -> String {
    match config {
        PublisherConfig::Stdout => "stdout (JSON lines)".into(),
        #[cfg(feature = "broker-kafka")]
        PublisherConfig::Kafka(config) => format!("kafka {}", config.brokers),
        #[cfg(feature = "broker-amqp")]
        PublisherConfig::Amqp(config) => format!("amqp {}", config.redacted_uri()),
        #[cfg(feature = "broker-nats")]
        PublisherConfig::Nats(config) => format!("nats {}", crate::config::redact(&config.url)),
    }
}
