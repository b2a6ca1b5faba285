//! `mayfly-ca`: the control plane and its admin CLI. The commands are in `cli/`; this is the
//! entry point: parse, run on a multi-threaded runtime, report an error once, exit.

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// An error and its causes, each said once (see [`mayfly_ca::report::report`]).
fn report(e: &anyhow::Error) -> String {
    mayfly_ca::report::report(e.as_ref())
}

fn main() -> ExitCode {
    mayfly_ca::report::end_quietly_on_closed_output();
    let cli = cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cli::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<cli::Reported>() => ExitCode::FAILURE,
        Err(e) if e.is::<cli::ExitWith>() => {
            ExitCode::from(e.downcast_ref::<cli::ExitWith>().map_or(1, |x| x.0))
        }
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}
