//! `azp-testbed`: one binary, dispatched busybox-style (see tests/testbed/README.md).
//!
//! - invoked as `Agent.Listener` (the stand-in agent's `bin/Agent.Listener` symlink): the stand-in listener;
//! - `azp-testbed standin-layout DIR [--listener PATH]`: lay out a stand-in agent install folder;
//! - `azp-testbed sim …`: the ADO + Entra simulator; `azp-testbed node …`: the node harness.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser as _;

const USAGE: &str =
    "usage: azp-testbed <demo | sim [--config FILE] | node --help | standin-layout DIR [--listener PATH]>
(invoked as Agent.Listener it is the stand-in agent's listener)";

fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let invoked_as = Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if invoked_as == "Agent.Listener" {
        return exit(azp_testbed::standin::listener_main(rest));
    }
    let Some((command, tail)) = rest.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match command.as_str() {
        "standin-layout" => standin_layout(tail),
        // Hidden: the stand-in's probe "job step".
        "standin-step" => exit(azp_testbed::standin::probe_step_main()),
        "sim" => run_async(sim(tail)),
        // The newcomer's demo (tests/demo.sh): the whole loop with a summary.
        "demo" => {
            azp_testbed::install_crypto_provider();
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(azp_testbed::demo::run()),
                Err(e) => {
                    eprintln!("azp-testbed: cannot start the async runtime: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        "node" => {
            let parsed = NodeCli::try_parse_from(
                std::iter::once("azp-testbed node").chain(tail.iter().map(String::as_str)),
            );
            match parsed {
                Ok(cli) => run_async(async move {
                    azp_testbed::node::run_cli(cli.args)
                        .await
                        .map_err(|e| e.to_string())
                }),
                Err(e) => {
                    let _ = e.print();
                    ExitCode::from(2)
                }
            }
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("azp-testbed: unknown command '{other}'\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// `azp-testbed node …`: the node harness' own flags.
#[derive(clap::Parser)]
struct NodeCli {
    #[command(flatten)]
    args: azp_testbed::node::NodeArgs,
}

fn run_async(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    azp_testbed::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("azp-testbed: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("azp-testbed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `azp-testbed sim [--config FILE]`: runs the simulator (settings: a JSON `SimConfig`, camelCase) until
/// SIGINT/SIGTERM, printing its URLs as one JSON line.
async fn sim(args: &[String]) -> Result<(), String> {
    use azp_testbed::sim::{SimConfig, Simulator};
    use tokio::signal::unix::{SignalKind, signal};
    let config = match args {
        [] => SimConfig::default(),
        [flag, path] if flag == "--config" => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("sim --config {path}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| {
                format!("sim --config {path}: not a valid simulator config (JSON SimConfig, camelCase): {e}")
            })?
        }
        _ => return Err("usage: azp-testbed sim [--config FILE]".into()),
    };
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let sim = Simulator::start(config).await.map_err(|e| e.to_string())?;
    println!("{}", sim.urls_json());
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    sim.shutdown();
    Ok(())
}

fn standin_layout(args: &[String]) -> ExitCode {
    let mut dir = None;
    let mut listener: Option<PathBuf> = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--listener" => match iter.next() {
                Some(p) => listener = Some(PathBuf::from(p)),
                None => {
                    eprintln!("--listener needs the path of the azp-testbed binary");
                    return ExitCode::from(2);
                }
            },
            other if dir.is_none() => dir = Some(PathBuf::from(other)),
            other => {
                eprintln!("standin-layout: unexpected argument '{other}'\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("standin-layout: missing DIR (the agent install folder to create)\n{USAGE}");
        return ExitCode::from(2);
    };
    match azp_testbed::standin::layout(&dir, listener.as_deref()) {
        Ok(dir) => {
            println!("{}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("standin-layout: {e}");
            ExitCode::FAILURE
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
