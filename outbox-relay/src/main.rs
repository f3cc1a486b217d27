//! `outbox-relay`: publishes committed outbox messages from any store to any broker.
//!
//! See the README for the configuration file, the environment overrides and the subcommands.

fn main() -> std::process::ExitCode {
    outbox_relay::main()
}
