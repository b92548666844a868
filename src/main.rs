//! `switchboard`: CLI entry point. Parses arguments, sets up tracing and signals, and
//! hands over to the library. `anyhow` lives here only.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::{app::App, cli, config::Config, server};

/// jemalloc keeps RSS closest to the live heap for our allocation pattern (long-lived small
/// session objects interleaved with short-lived handshake buffers). Measured with
/// `loadgen idle --clients 10000`: glibc ~16 KB, mimalloc ~4.2-4.8 KB, jemalloc ~2.7 KB of
/// RSS per idle connection, for ~2 KB of live heap (docs/performance.md).
///
/// Its options are compiled in from `.cargo/config.toml` (`JEMALLOC_SYS_WITH_MALLOC_CONF`,
/// `_RJEM_MALLOC_CONF` overrides them at run time): a background thread and a 1 s decay, so
/// the pages a connect storm frees in one burst go back to the system within about a
/// second. With the default 10 s decay and no background thread they stay resident until
/// later allocation activity purges them, which an idle gateway never has.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "WebSocket edge gateway")]
struct Cli {
    /// Config file (TOML); environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print the effective configuration (secrets redacted); fail if it is invalid.
    CheckConfig,
    /// Mint a JWT with the configured secret.
    Token {
        #[arg(long)]
        sub: String,
        /// A project the token grants (repeatable; `*` for all).
        #[arg(long = "project", required = true)]
        projects: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// A service token (role: service) for the HTTP API.
        #[arg(long)]
        service: bool,
    },
    /// Print the message schemas generated from the gateway's types.
    Schema {
        #[arg(long, value_enum, default_value_t = SchemaFormat::Typescript)]
        format: SchemaFormat,
    },
    /// Publish events through a gateway's HTTP API (one JSON object per stdin line).
    Publish {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long)]
        project: String,
        /// One event as JSON instead of stdin.
        #[arg(long)]
        event: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchemaFormat {
    Typescript,
    JsonSchema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchboard: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Schema { format } => {
            let text = match format {
                SchemaFormat::Typescript => switchboard::schema::generate::typescript(),
                SchemaFormat::JsonSchema => switchboard::schema::generate::json_schema(),
            };
            print!("{text}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig => {
            print!("{}", config.redacted_toml());
            println!("# broker_topology = {}", config.redis.describe_topology());
            ExitCode::SUCCESS
        }
        Command::Token {
            sub,
            projects,
            ttl,
            service,
        } => match cli::token(&config, &sub, &projects, ttl, service) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("switchboard: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Publish {
            url,
            project,
            event,
        } => {
            let run = || -> anyhow::Result<Vec<u64>> {
                let token = cli::token(
                    &config,
                    "switchboard-cli",
                    std::slice::from_ref(&project),
                    300,
                    true,
                )?;
                let events = cli::read_events(event.as_deref(), std::io::stdin().lock())?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(cli::publish(&url, &project, &token, events))?)
            };
            match run() {
                Ok(seqs) => {
                    println!("{}", serde_json::json!({ "seq": seqs }));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("switchboard: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(mut config: Config) -> anyhow::Result<()> {
    init_tracing(&config.log.format);
    let mut generated = false;
    if !config.has_credential_key() {
        // Development only (validate() refuses production without a key).
        let secret: [u8; 32] = rand::random();
        config.auth.jwt_secret = Some(secret.iter().map(|b| format!("{b:02x}")).collect());
        generated = true;
        tracing::warn!(
            "no JWT secret configured: generated a random one for this process (development only)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let app = App::build(config.clone())?;
        let (listener, addr) = server::bind(&app).await?;
        let admin = server::bind_admin(&app).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "switchboard listening on {addr}")?;
        if let Some((_, admin_addr)) = &admin {
            writeln!(out, "admin listening on {admin_addr}")?;
        }
        let mut ready_line = false;
        // Only a secret generated just now: a token signed with a configured secret would
        // be a 24-hour credential for the real deployment, printed to whoever reads stdout.
        if generated {
            if let Ok(token) = cli::token(&config, "dev-user", &["demo".to_owned()], 86_400, false) {
                writeln!(out, "ready: ws://{addr}/ws/demo?token={token}")?;
                ready_line = true;
            }
        }
        if config.console_enabled() {
            // The token stays out of this URL: the page asks for it (see src/console.rs).
            let hint = if ready_line {
                " (project demo, the token of the ready line)"
            } else {
                ""
            };
            writeln!(out, "console: http://{addr}/console/{hint}")?;
        }
        out.flush()?;
        drop(out);
        tracing::info!(%addr, instance_id = %app.instance_id, broker = app.broker.kind(), "switchboard started");
        let admin = admin.map(|(l, _)| tokio::spawn(server::serve_admin(app.clone(), l)));
        server::serve(app, listener, shutdown_signal()).await;
        if let Some(admin) = admin {
            admin.abort();
        }
        Ok::<(), anyhow::Error>(())
    });
    // Background tasks (pub/sub manager, linger timers) must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
