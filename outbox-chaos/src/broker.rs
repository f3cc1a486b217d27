//! The brokers of a run: a private NATS server (restartable, file storage), a private tansu
//! (Kafka protocol, in memory, advertising a fault proxy), a queue of its own on the shared
//! RabbitMQ; each read back in full by the checker.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use outbox_core::{MESSAGE_ID_HEADER, MessageId};
use outbox_nats::async_nats;
use outbox_testkit::env::service_url;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::history::Delivery;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A free port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn wait_listening(addr: SocketAddr, bound: Duration) -> Result<(), BoxError> {
    let deadline = Instant::now() + bound;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {addr} after {bound:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Sends SIGTERM to `child` and waits up to `bound` for it, then kills it.
pub async fn terminate(child: &mut Child, bound: Duration) -> Option<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(bound, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            let _ = child.kill().await;
            None
        }
    }
}

fn find_program(var: &str, name: &str, extra: &[PathBuf]) -> Result<PathBuf, String> {
    if let Ok(bin) = std::env::var(var) {
        return Ok(PathBuf::from(bin));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    candidates.extend(extra.iter().cloned());
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .ok_or_else(|| format!("no {name} executable (set {var})"))
}

/// A NATS server with JetStream of one run: file storage in the run's directory, so that a
/// restart keeps the stream.
pub struct NatsServer {
    bin: PathBuf,
    addr: SocketAddr,
    store_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts one on a free port, storing in `dir`; `extra` arguments are passed on (TLS).
    pub async fn start(dir: &Path, extra: &[String]) -> Result<Self, BoxError> {
        let bin = find_program(
            "NATS_SERVER_BIN",
            "nats-server",
            &[PathBuf::from("/usr/sbin/nats-server")],
        )?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut server = Self {
            bin,
            addr,
            store_dir: dir.join("jetstream"),
            log: dir.join("nats-server.log"),
            child: None,
            extra: extra.to_vec(),
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<(), BoxError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.addr.port().to_string())
            .arg("-js")
            .arg("-sd")
            .arg(&self.store_dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        wait_listening(self.addr, Duration::from_secs(20)).await
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server (SIGTERM, SIGKILL when `crash`) and starts it again on the same port
    /// and store after `down` (up to 20 s for the port and the stream to come back).
    pub async fn restart(&mut self, crash: bool, down: Duration) -> Result<(), BoxError> {
        if let Some(mut child) = self.child.take() {
            if crash {
                let _ = child.kill().await;
            } else {
                terminate(&mut child, Duration::from_secs(10)).await;
            }
        }
        tokio::time::sleep(down).await;
        self.spawn().await
    }

    /// Stops it.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5)).await;
        }
    }
}

/// A connection to `url` and its JetStream context.
pub async fn jetstream(url: &str) -> Result<async_nats::jetstream::Context, BoxError> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    Ok(async_nats::jetstream::new(client))
}

/// Creates a file-backed stream `name` for `subjects`. Tries again a few times: a NATS 2.9
/// server creating a stream while another one of the account is being deleted can lose a race
/// on the account's stream directory ("could not create storage directory").
pub async fn create_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    subjects: &str,
) -> Result<(), BoxError> {
    let mut attempt = 0;
    loop {
        let created = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            Err(err) if attempt < 4 => {
                attempt += 1;
                tracing::warn!(%err, attempt, "creating a stream failed; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Reads the whole stream `name` in stream order. Retries while the server comes back.
pub async fn read_stream(
    url: &str,
    name: &str,
    bound: Duration,
) -> Result<Vec<Delivery>, BoxError> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    let deadline = Instant::now() + bound;
    let js = loop {
        match jetstream(url).await {
            Ok(js) => break js,
            Err(err) if Instant::now() > deadline => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut stream = js.get_stream(name).await?;
    let total = stream.info().await?.state.messages as usize;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut got = Vec::with_capacity(total);
    while got.len() < total {
        let next = tokio::time::timeout_at(deadline, messages.next()).await;
        let Ok(Some(message)) = next else {
            return Err(format!("read {} of {total} messages of stream {name}", got.len()).into());
        };
        let message = message?;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .and_then(|v| v.as_str().parse::<MessageId>().ok())
            .ok_or("a message without Nats-Msg-Id")?;
        got.push(Delivery {
            id,
            payload: message.payload.to_vec(),
        });
    }
    let _ = js.delete_stream(name).await;
    Ok(got)
}

/// A tansu broker of one run, in memory, advertising `advertised` (the fault proxy), so that
/// every connection of every client goes through it.
pub struct Tansu {
    child: Child,
    addr: SocketAddr,
}

impl Tansu {
    /// Starts one on a free port.
    pub async fn start(addr: SocketAddr, advertised: SocketAddr) -> Result<Self, BoxError> {
        let child = outbox_testkit::tansu::start(addr, advertised).await?;
        Ok(Self { child, addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Creates `topic` with `partitions` partitions through `brokers`.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), BoxError> {
    use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use outbox_kafka::rdkafka::client::DefaultClientContext;
    use outbox_kafka::rdkafka::config::ClientConfig;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new], &options).await? {
        result.map_err(|(topic, code)| format!("creating topic {topic}: {code:?}"))?;
    }
    Ok(())
}

/// Reads `topic` from its beginning until every id of `wanted` arrived and nothing more came
/// for `quiet`, or `bound` passed. Per key the order is the partition's.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    wanted: &HashSet<MessageId>,
    quiet: Duration,
    bound: Duration,
) -> Result<Vec<Delivery>, BoxError> {
    use outbox_kafka::rdkafka::config::ClientConfig;
    use outbox_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
    use outbox_kafka::rdkafka::message::{Headers as _, Message as _};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            outbox_testkit::env::unique_name("outbox_chaos_reader"),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = Instant::now() + bound;
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    loop {
        let complete = wanted.iter().all(|id| seen.contains(id));
        let wait = if complete {
            quiet
        } else {
            Duration::from_secs(5)
        };
        let until = (Instant::now() + wait).min(deadline);
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(message)) => {
                let id = message
                    .headers()
                    .and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == MESSAGE_ID_HEADER)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| v.parse::<MessageId>().ok())
                    })
                    .ok_or("a record without its id header")?;
                seen.insert(id);
                got.push(Delivery {
                    id,
                    payload: message.payload().unwrap_or_default().to_vec(),
                });
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "consumer error, retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) if complete || Instant::now() >= deadline => return Ok(got),
            Err(_) => {}
        }
    }
}

/// The RabbitMQ of the tests (`OUTBOX_TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    service_url(
        "OUTBOX_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

/// A queue of the run's own on the shared RabbitMQ.
pub struct Queue {
    channel: lapin::Channel,
    name: String,
}

impl Queue {
    /// Declares a durable queue `name`.
    pub async fn declare(url: &str, name: &str) -> Result<Self, BoxError> {
        use lapin::options::QueueDeclareOptions;
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        Ok(Self {
            channel,
            name: name.to_owned(),
        })
    }

    /// Reads until every id of `wanted` arrived and nothing more came for `quiet`, or `bound`
    /// passed, in queue order.
    pub async fn read(
        &self,
        wanted: &HashSet<MessageId>,
        quiet: Duration,
        bound: Duration,
    ) -> Result<Vec<Delivery>, BoxError> {
        use lapin::options::BasicConsumeOptions;
        let mut consumer = self
            .channel
            .basic_consume(
                self.name.as_str().into(),
                outbox_testkit::env::unique_name("reader").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        let deadline = Instant::now() + bound;
        let mut got = Vec::new();
        let mut seen = HashSet::new();
        loop {
            let complete = wanted.iter().all(|id| seen.contains(id));
            let wait = if complete {
                quiet
            } else {
                Duration::from_secs(5)
            };
            let until = (Instant::now() + wait).min(deadline);
            match tokio::time::timeout_at(until, consumer.next()).await {
                Ok(Some(delivery)) => {
                    let delivery = delivery?;
                    let id = delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|s| s.as_str().parse::<MessageId>().ok())
                        .ok_or("a message without message_id")?;
                    seen.insert(id);
                    got.push(Delivery {
                        id,
                        payload: delivery.data,
                    });
                }
                Ok(None) => return Err("the queue's consumer ended".into()),
                Err(_) if complete || Instant::now() >= deadline => return Ok(got),
                Err(_) => {}
            }
        }
    }

    /// Deletes the queue.
    pub async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.name.as_str().into(), Default::default())
            .await;
    }
}
