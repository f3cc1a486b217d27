//! Servers in Docker containers, for developers with a Docker engine (feature
//! `testcontainers`). The workspace's CI runs against servers on the machine instead and only
//! compiles this module, since its machines have no Docker engine.
//!
//! Each function starts one server and returns its URL with the container, which is removed
//! when dropped. Export the URL in the variable the tests read (for example
//! `OUTBOX_TEST_POSTGRES_URL`), or pass it to your harness.

use testcontainers_modules::testcontainers::core::ContainerPort;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{
    ContainerAsync, Image, ImageExt, TestcontainersError,
};

/// A running container and the URL of its server.
pub struct Started<I: Image> {
    /// The server's URL on the Docker host.
    pub url: String,
    /// The container; dropping it removes it.
    pub container: ContainerAsync<I>,
}

async fn host_port<I: Image>(
    container: &ContainerAsync<I>,
    port: u16,
) -> Result<(String, u16), TestcontainersError> {
    let host = container.get_host().await?.to_string();
    let port = container
        .get_host_port_ipv4(ContainerPort::Tcp(port))
        .await?;
    Ok((host, port))
}

/// PostgreSQL; URL `postgres://postgres:postgres@HOST:PORT/postgres`.
pub async fn postgres()
-> Result<Started<testcontainers_modules::postgres::Postgres>, TestcontainersError> {
    let container = testcontainers_modules::postgres::Postgres::default()
        .start()
        .await?;
    let (host, port) = host_port(&container, 5432).await?;
    Ok(Started {
        url: format!("postgres://postgres:postgres@{host}:{port}/postgres"),
        container,
    })
}

/// MariaDB; URL `mysql://root@HOST:PORT/test`.
pub async fn mariadb()
-> Result<Started<testcontainers_modules::mariadb::Mariadb>, TestcontainersError> {
    let container = testcontainers_modules::mariadb::Mariadb::default()
        .start()
        .await?;
    let (host, port) = host_port(&container, 3306).await?;
    Ok(Started {
        url: format!("mysql://root@{host}:{port}/test"),
        container,
    })
}

/// RabbitMQ; URL `amqp://guest:guest@HOST:PORT/%2f`.
pub async fn rabbitmq()
-> Result<Started<testcontainers_modules::rabbitmq::RabbitMq>, TestcontainersError> {
    let container = testcontainers_modules::rabbitmq::RabbitMq::default()
        .start()
        .await?;
    let (host, port) = host_port(&container, 5672).await?;
    Ok(Started {
        url: format!("amqp://guest:guest@{host}:{port}/%2f"),
        container,
    })
}

/// NATS with JetStream; URL `nats://HOST:PORT`.
pub async fn nats() -> Result<Started<testcontainers_modules::nats::Nats>, TestcontainersError> {
    let container = testcontainers_modules::nats::Nats::default()
        .with_cmd(["--jetstream"])
        .start()
        .await?;
    let (host, port) = host_port(&container, 4222).await?;
    Ok(Started {
        url: format!("nats://{host}:{port}"),
        container,
    })
}
