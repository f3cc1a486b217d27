//! Where the servers are (environment variables with loopback defaults, as in the tests), and
//! whether they answer.

use std::time::Duration;

use outbox_testkit::env::{required, service_url};

/// Addresses of the servers the scenarios use.
#[derive(Clone, Debug)]
pub(crate) struct Services {
    pub(crate) postgres: String,
    pub(crate) mysql: String,
    pub(crate) nats: String,
    pub(crate) kafka: String,
    pub(crate) amqp: String,
}

impl Services {
    pub(crate) fn from_env() -> Self {
        Self {
            postgres: service_url(
                "OUTBOX_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            mysql: service_url("OUTBOX_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
            nats: service_url("OUTBOX_TEST_NATS_URL", "nats://127.0.0.1:4222"),
            kafka: service_url("OUTBOX_TEST_KAFKA_BROKERS", "127.0.0.1:9092"),
            amqp: service_url(
                "OUTBOX_TEST_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
        }
    }
}

/// Why a result was not measured.
#[derive(Debug)]
pub(crate) enum Unavailable {
    /// A server is missing and not required: the result is skipped.
    Skip(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Skip(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for Unavailable {}

/// `host:port` of a URL such as `postgres://user@host:port/db` or a bare `host:port` list.
fn address(url: &str, default_port: u16) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.split(',').next().unwrap_or(rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    }
}

/// Ok when `service` at `url` accepts TCP connections; otherwise a skip, or an error when
/// `OUTBOX_TEST_REQUIRE=1`.
pub(crate) async fn reachable(service: &str, url: &str, default_port: u16) -> crate::Res<()> {
    let addr = address(url, default_port);
    let connect = tokio::net::TcpStream::connect(addr.as_str());
    let result = match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(err)) => err.to_string(),
        Err(_) => "no answer within 2s".to_owned(),
    };
    let reason = format!("{service} unreachable at {addr}: {result}");
    if required() {
        Err(format!("{reason} (OUTBOX_TEST_REQUIRE=1)").into())
    } else {
        Err(Box::new(Unavailable::Skip(reason)))
    }
}

#[cfg(test)]
mod tests {
    use super::address;

    #[test]
    fn addresses_come_from_urls() {
        assert_eq!(
            address("postgres://postgres@127.0.0.1:5432/test", 5432),
            "127.0.0.1:5432"
        );
        assert_eq!(
            address("amqp://guest:guest@127.0.0.1:5672/%2f", 5672),
            "127.0.0.1:5672"
        );
        assert_eq!(address("127.0.0.1:9092", 9092), "127.0.0.1:9092");
        assert_eq!(address("nats://localhost", 4222), "localhost:4222");
    }
}
