//! `p11shim-broker`: serve credentials, check a configuration, or print
//! this machine's fingerprint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use p11shim_broker::clock::SystemClock;
use p11shim_broker::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "p11shim-broker",
    version,
    about = "Credential broker for the p11shim PKCS#11 module"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve credential requests.
    Serve {
        #[arg(long, short, default_value = "/etc/p11shim-broker/broker.toml")]
        config: PathBuf,
    },
    /// Validate a configuration: syntax, the store, every role's secrets
    /// (read, never printed).
    Check {
        #[arg(long, short, default_value = "/etc/p11shim-broker/broker.toml")]
        config: PathBuf,
    },
    /// Print this machine's fingerprint for a `static-fingerprint` role.
    Fingerprint {
        /// Attributes to cover, comma-separated.
        #[arg(long, default_value = "machine-id,hostname,addresses")]
        attributes: String,
    },
}

fn logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("P11SHIM_BROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().flatten_event(true).init();
    } else {
        b.with_ansi(false).init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("p11shim-broker: {e}");
                    return ExitCode::from(2);
                }
            };
            logging(&cfg.server.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("p11shim-broker: runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let listen = cfg.server.listen;
            let listener = match std::net::TcpListener::bind(listen) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%listen, error = %e, "cannot listen");
                    return ExitCode::FAILURE;
                }
            };
            // Outside the runtime: the PostgreSQL store's client runs one of
            // its own, which cannot start inside another.
            let broker = match p11shim_broker::run::build(cfg, Arc::new(SystemClock)) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                let handle = axum_server::Handle::new();
                let h = handle.clone();
                tokio::spawn(async move {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("shutting down");
                    h.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
                });
                let addr = listener.local_addr().ok();
                let mut served =
                    tokio::spawn(p11shim_broker::run::serve(broker, listener, handle.clone()));
                // Serving can fail before it listens (a TLS key that cannot
                // be read), and then `listening` never returns.
                let early = tokio::select! {
                    listening = handle.listening() => {
                        if let (Some(_), Some(a)) = (listening, addr) {
                            // Tests and scripts read the bound address from here.
                            println!("listening {a}");
                        }
                        None
                    }
                    done = &mut served => Some(done),
                };
                let done = match early {
                    Some(done) => done,
                    None => served.await,
                };
                match done {
                    Ok(Ok(())) => ExitCode::SUCCESS,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "stopped");
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "stopped");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Check { config } => match check(&config) {
            Ok(n) => {
                println!(
                    "{}: valid, {n} role(s), store reachable, every secret readable",
                    config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("p11shim-broker: {e}");
                ExitCode::from(2)
            }
        },
        Command::Fingerprint { attributes } => {
            let names: Vec<String> = attributes.split(',').map(|s| s.trim().to_owned()).collect();
            match p11shim_proto::fingerprint::collect(&names) {
                Ok(a) => {
                    for (k, v) in &a {
                        eprintln!("{k} = {v}");
                    }
                    println!("{}", p11shim_proto::fingerprint::fingerprint(&a));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("p11shim-broker: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> Result<usize, String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    p11shim_broker::run::check(&cfg)?;
    Ok(cfg.roles.len())
}
