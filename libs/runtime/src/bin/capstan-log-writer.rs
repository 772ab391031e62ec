//! The log writer on its own (`capstan-log-writer __log-writer PATH
//! MAX_BYTES KEEP`), for embedders of the process driver and its tests;
//! the agent's and `capstan`'s binaries are log writers themselves when
//! called with `__log-writer`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some(capstan_runtime::logs::WRITER_ARG) {
        eprintln!(
            "usage: capstan-log-writer {} PATH MAX_BYTES KEEP",
            capstan_runtime::logs::WRITER_ARG
        );
        std::process::exit(2);
    }
    std::process::exit(capstan_runtime::logs::writer_main(&args[1..]));
}
