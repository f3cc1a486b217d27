//! `outbox-chaos`: runs the chaos harness and prints what it measured.
//!
//! ```text
//! outbox-chaos [COMBINATION...]      # postgres-nats postgres-kafka mysql-amqp sqlite-nats
//!                                    # postgres-cdc-nats postgres-cdc-amqp (default: all)
//! OUTBOX_CHAOS_PROFILE=long outbox-chaos postgres-nats
//! OUTBOX_CHAOS_SEED=1234 outbox-chaos sqlite-nats    # replay a run's random choices
//! ```
//!
//! The relay executable is `chaos-relay` next to this one (the `outbox-relay` program under
//! this package's name), or `OUTBOX_RELAY_BIN`. Exits 1 when a run found a violation, 2 on a bad
//! argument or a missing server.

use std::path::PathBuf;
use std::process::ExitCode;

use outbox_chaos::{Combination, Options, Profile, run, seed_from_env};

fn relay_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("OUTBOX_RELAY_BIN") {
        return PathBuf::from(bin);
    }
    std::env::current_exe()
        .map(|exe| exe.with_file_name("chaos-relay"))
        .unwrap_or_else(|_| PathBuf::from("chaos-relay"))
}

fn main() -> ExitCode {
    let mut combinations = Vec::new();
    for arg in std::env::args().skip(1) {
        match Combination::from_name(&arg) {
            Some(c) => combinations.push(c),
            None => {
                eprintln!(
                    "outbox-chaos: unknown combination `{arg}`: use {}",
                    Combination::ALL.map(Combination::name).join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    if combinations.is_empty() {
        combinations = Combination::ALL.to_vec();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("outbox-chaos: {err}");
            return ExitCode::from(2);
        }
    };
    let mut failed = false;
    let mut rows = Vec::new();
    for combination in combinations {
        let options = Options {
            relay_bin: relay_bin(),
            profile: Profile::from_env(),
            seed: seed_from_env(),
        };
        eprintln!(
            "running {} ({} profile, seed {})",
            combination.name(),
            options.profile.name,
            options.seed
        );
        match runtime.block_on(run(combination, &options)) {
            Ok(report) => {
                println!("{report}");
                failed |= !report.passed();
                rows.push(report.markdown_row());
            }
            Err(err) => {
                eprintln!("outbox-chaos: {}: cannot run: {err}", combination.name());
                return ExitCode::from(2);
            }
        }
    }
    println!(
        "| combination | profile | messages | faults | lost | late | phantoms | out of order | dead letters | duplicates | time |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        println!("{row}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
