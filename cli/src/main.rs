//! `amqp`: publish, consume, get, declare, delete, purge, bind and unbind on
//! an AMQP 0-9-1 broker from the shell. See the README's "Command-line tool"
//! section; the exit codes are listed in [`fail::Code`] and in `--help`.

mod consume;
mod fail;
mod manage;
mod publish;
mod values;

use std::process::ExitCode;
use std::time::Duration;

use amqp091::{Config, Connection, RecoveryConfig};
use clap::{Parser, Subcommand};

use fail::{amqp, Code, Failure};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  usage: a bad flag or value, an unreadable file
  2  connection: bad URL, unreachable broker, wrong credentials, unknown vhost
  3  the broker refused the operation (404 no such queue or exchange, 406, 403…)
  4  a published message was nacked or returned (mandatory, unroutable)
  5  --timeout expired before the messages asked for arrived
  6  get: the queue was empty";

/// A command-line client for AMQP 0-9-1 brokers (RabbitMQ).
#[derive(Debug, Parser)]
#[command(name = "amqp", version, after_help = EXIT_CODES)]
struct Cli {
    /// The broker: amqp://user:password@host:port/vhost (amqps:// for TLS).
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    url: String,
    /// Seconds to wait for the TCP connect and the AMQP handshake.
    #[arg(long, global = true, default_value_t = 10, value_name = "SECS")]
    connect_timeout: u64,
    /// No progress bar, even on a terminal.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish messages: the BODY argument, stdin, files, or one per stdin line.
    Publish(Box<publish::PublishArgs>),
    /// Consume messages from a queue and print them.
    Consume(consume::ConsumeArgs),
    /// Fetch one message from a queue (basic.get) and print it.
    Get(consume::GetArgs),
    /// Declare a queue or an exchange.
    #[command(subcommand)]
    Declare(manage::Declare),
    /// Delete a queue or an exchange (fails when it does not exist, unless --if-exists).
    #[command(subcommand)]
    Delete(manage::Delete),
    /// Remove every ready message from a queue; prints how many.
    Purge(manage::PurgeArgs),
    /// Bind a queue or an exchange to an exchange.
    #[command(subcommand)]
    Bind(manage::Bind),
    /// Remove a binding.
    #[command(subcommand)]
    Unbind(manage::Bind),
}

/// What every subcommand needs: where the broker is, whether to draw progress.
#[derive(Debug, Clone)]
pub struct Context {
    url: String,
    connect_timeout: Duration,
    /// Whether a progress bar may be drawn (it still needs a terminal).
    pub progress: bool,
}

impl Context {
    /// Connects without recovery: a tool that is run once should fail and
    /// say why, not reconnect behind the user's back.
    pub async fn connect(&self) -> Result<Connection, Failure> {
        let mut config: Config = self
            .url
            .parse()
            .map_err(|error| Failure::new(Code::Connection, format!("bad URL: {error}")))?;
        config.connection_timeout = self.connect_timeout;
        let config = config.recovery(RecoveryConfig::disabled());
        Connection::connect(config).await.map_err(amqp("connect"))
    }
}

/// A clap error as one line (`amqp: <cause>`), its usage text left to `--help`.
fn usage_line(error: &clap::Error) -> String {
    let text = error.render().to_string();
    let cause = text
        .split("\n\nUsage:")
        .next()
        .unwrap_or_default()
        .split("\n\nFor more information")
        .next()
        .unwrap_or_default();
    let cause = cause.strip_prefix("error: ").unwrap_or(cause);
    Failure::usage(format!("{cause} (see amqp --help)")).line()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if error.use_stderr() => {
            eprintln!("{}", usage_line(&error));
            return ExitCode::from(Code::Usage as u8);
        }
        // --help and --version.
        Err(error) => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
    };
    let context = Context {
        url: cli.url,
        connect_timeout: Duration::from_secs(cli.connect_timeout),
        progress: !cli.quiet,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!(
                "{}",
                Failure::usage(format!("cannot start tokio: {error}")).line()
            );
            return ExitCode::from(Code::Usage as u8);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Publish(args) => publish::run(&context, *args).await,
            Command::Consume(args) => consume::consume(&context, args).await,
            Command::Get(args) => consume::get(&context, args).await,
            Command::Declare(args) => manage::declare(&context, args).await,
            Command::Delete(args) => manage::delete(&context, args).await,
            Command::Purge(args) => manage::purge(&context, args).await,
            Command::Bind(args) => manage::bind(&context, args, true).await,
            Command::Unbind(args) => manage::bind(&context, args, false).await,
        }
    });
    // Not waiting for tasks still running (a stdin reader blocked on a
    // terminal) once the outcome is known.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{}", failure.line());
            ExitCode::from(failure.code as u8)
        }
    }
}

/// A progress bar with count and rate on stderr: hidden unless progress is
/// wanted and stderr is a terminal (indicatif's stderr target checks it).
pub fn progress_bar(context: &Context, length: Option<u64>, verb: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
    use std::fmt::Write;
    if !context.progress {
        return ProgressBar::hidden();
    }
    let template = match length {
        Some(_) => format!("{{bar:30}} {{pos}}/{{len}} {verb} ({{rate}}, {{elapsed}})"),
        None => format!("{{spinner}} {{pos}} {verb} ({{rate}}, {{elapsed}})"),
    };
    let bar = ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(&template) {
        // Whole messages per second: indicatif's own rate shows four decimals.
        let style = style.with_key("rate", |state: &ProgressState, out: &mut dyn Write| {
            let _ = write!(out, "{:.0}/s", state.per_sec());
        });
        bar.set_style(style);
    }
    bar
}
