//! The `cxgate` command line: parse, set up logging, call the library. Nothing else.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// jemalloc rather than the system allocator: with 100,000 cached entries it holds about
/// 15% less resident memory (glibc keeps what the many short-lived buffers of upstream
/// exchanges leave behind) at the same hit throughput, and built with an 8-byte quantum
/// (src/allocator.rs) 16 bytes per entry less again; README "Memory per cached entry".
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;

#[cfg(not(target_env = "msvc"))]
mod allocator;

/// `println!` that never panics on a closed stdout (see `cxgate::logging::say`).
macro_rules! println {
    () => { cxgate::logging::say(format_args!("")) };
    ($($arg:tt)*) => { cxgate::logging::say(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics on a closed stderr.
macro_rules! eprintln {
    ($($arg:tt)*) => { cxgate::logging::say_err(format_args!($($arg)*)) };
}

#[derive(Parser)]
#[command(
    name = "cxgate",
    version,
    about = "A local caching gateway in front of the CX Social (Engagor) API"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    /// Log level (overrides RUST_LOG), e.g. "info" or "cxgate=debug".
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The simulated CX Social API and the gateway in front of it, with a demo key.
    Demo {
        /// Address for client traffic (the gateway); pick another if 8080 is taken.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address for the status page, /metrics and /admin/*; pick another if 9090 is taken.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
    /// Run the gateway (production mode).
    Run {
        #[arg(long, env = "CXGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file without starting anything.
    Check {
        #[arg(long, env = "CXGATE_CONFIG")]
        config: PathBuf,
    },
    /// Run the simulated CX Social API alone.
    Sim(Box<cxgate::sim::SimArgs>),
    /// Client keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The OAuth token file.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Read a key on stdin, print the SHA-256 hex for clients[].key_sha256.
    Hash,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Write the token file from CX_ACCESS_TOKEN (+ CX_REFRESH_TOKEN, CX_EXPIRES_IN), or
    /// exchange an authorisation code.
    Init {
        #[arg(long, env = "CXGATE_CONFIG")]
        config: PathBuf,
        /// Authorisation code to exchange at the OAuth token endpoint.
        #[arg(long)]
        code: Option<String>,
        /// The redirect URI the code was issued for, if the provider requires it.
        #[arg(long)]
        redirect_uri: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logs = cxgate::logging::init(
        matches!(cli.log_format, LogFormat::Json),
        cli.log_level.as_deref(),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cxgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = matches!(cli.log_format, LogFormat::Json);
    runtime.block_on(dispatch(cli.command, json))
}

/// `json`: `--log-format json`, which the access log follows too.
async fn dispatch(command: Command, json: bool) -> ExitCode {
    match command {
        Command::Demo {
            listen,
            admin_listen,
        } => finish(cxgate::demo::run(listen, admin_listen).await),
        Command::Run { config } => match cxgate::config::load(&config) {
            Ok(mut cfg) => {
                cfg.server.access_log_json = json;
                let secrets = cxgate::Secrets::from_env(&cfg);
                // What `check` refuses about the files the config names (a TLS pair, a CA
                // file, the access log, the token file) is an invalid configuration here
                // too: exit 2, with the same lines, before anything starts.
                let (problems, _) = cxgate::app::reload::preflight(&cfg, &secrets);
                if !problems.is_empty() {
                    for problem in &problems {
                        eprintln!("{problem}");
                    }
                    return ExitCode::from(2);
                }
                finish(cxgate::run(cfg, Some(config), secrets).await)
            }
            Err(e) => invalid(&e),
        },
        Command::Check { config } => match cxgate::config::load(&config) {
            Ok(cfg) => {
                // `check` refuses what `run` would refuse about the files the config names.
                let secrets = cxgate::Secrets::from_env(&cfg);
                let (problems, warnings) = cxgate::app::reload::preflight(&cfg, &secrets);
                for warning in &warnings {
                    eprintln!("warning: {warning}");
                }
                if !problems.is_empty() {
                    for problem in &problems {
                        eprintln!("{problem}");
                    }
                    return ExitCode::from(2);
                }
                // And what `run` refuses only once it starts (a port taken, the token),
                // tried the way `run` tries it: the same message and exit code.
                match cxgate::app::probe(&cfg, &secrets).await {
                    Ok(warnings) => {
                        for warning in &warnings {
                            eprintln!("warning: {warning}");
                        }
                    }
                    Err(e) => return finish(Err(e)),
                }
                println!("{}: valid", config.display());
                println!("{}", cfg.summary());
                ExitCode::SUCCESS
            }
            Err(e) => invalid(&e),
        },
        Command::Sim(args) => match cxgate::sim::run_cli(*args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cxgate sim: {e}");
                ExitCode::from(1)
            }
        },
        Command::Key {
            command: KeyCommand::Hash,
        } => {
            let mut key = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut key) {
                eprintln!("cxgate key hash: cannot read stdin: {e}");
                return ExitCode::from(1);
            }
            let key = key.trim_end_matches(['\r', '\n']);
            if key.is_empty() {
                eprintln!("cxgate key hash: no key on stdin");
                return ExitCode::from(2);
            }
            if key.len() < SHORT_KEY {
                // A short key is easy to guess, and the check that refuses a key left in a
                // forwarded header or body meets it by chance (`1` is in most User-Agents).
                eprintln!(
                    "cxgate key hash: warning: this key is {} byte(s); use at least {SHORT_KEY} \
                     random bytes (e.g. `head -c 24 /dev/urandom | base64`)",
                    key.len()
                );
            }
            println!("{}", cxgate::auth::sha256_hex(key.as_bytes()));
            ExitCode::SUCCESS
        }
        Command::Token {
            command:
                TokenCommand::Init {
                    config,
                    code,
                    redirect_uri,
                },
        } => {
            let cfg = match cxgate::config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => return invalid(&e),
            };
            match cxgate::token_init(&cfg, code.as_deref(), redirect_uri.as_deref()).await {
                Ok(path) => {
                    println!("token file written: {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cxgate token init: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Keys shorter than this draw a warning from `cxgate key hash`.
const SHORT_KEY: usize = 16;

fn invalid(e: &cxgate::config::ConfigError) -> ExitCode {
    for line in e.lines() {
        eprintln!("{line}");
    }
    ExitCode::from(2)
}

fn finish(result: Result<(), cxgate::StartError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(cxgate::StartError::Config(e)) => invalid(&e),
        // A wrong Redis URL or CA file, or a client's key as the token, is an invalid
        // configuration, as `check` says.
        Err(e) if e.is_setting() => {
            eprintln!("cxgate: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("cxgate: {e}");
            ExitCode::from(1)
        }
    }
}
