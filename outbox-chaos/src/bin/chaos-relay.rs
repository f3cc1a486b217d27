//! The `outbox-relay` program under the name the chaos tests run (`CARGO_BIN_EXE_chaos-relay`).

fn main() -> std::process::ExitCode {
    outbox_relay::main()
}
