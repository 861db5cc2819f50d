//! The command line: flags, subcommands, logging setup, and the mapping from results to
//! exit statuses (docs/operations.md). `main` only calls [`run`].
//!
//! `vmsync --once` stops like the daemon on SIGTERM or SIGINT: the action in flight
//! finishes, the rest is recorded as interrupted, and it exits 128 + the signal's number
//! (143, 130); a second signal exits at once.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use crate::agent::report::Report;
use crate::agent::sync::{self, SyncError};
use crate::agent::{daemon, notify, render_cmd, shutdown, status, suspend};
use crate::apply::health_stage;
use crate::config::{self, Overrides};
use crate::desired::network_pool_entries;
use crate::host::hypervisor;
use crate::onboard::import;
use crate::reconcile::{plan_types, render};
use crate::record::store;

mod generate;

/// `vmsync --version`: the version, the commit it was built from and the libvirt it was
/// built against (build.rs; no libvirt connection is made).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit ",
    env!("VMSYNC_GIT_COMMIT"),
    "\nbuilt against libvirt ",
    env!("VMSYNC_LIBVIRT_VERSION"),
);

#[derive(Debug, Parser)]
#[command(
    name = "vmsync",
    version,
    long_version = LONG_VERSION,
    about = "Git-ops pull agent for libvirt hosts"
)]
pub struct Cli {
    /// Run one sync and exit (without it, and without a command: daemon mode).
    #[arg(long)]
    pub once: bool,
    /// Agent config file [default: /etc/vmsync/config.toml, if it exists].
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// VM repository: ssh://, https://, file:// or a local path ([source] url).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Branch to follow ([source] branch) [default: main].
    #[arg(long, global = true)]
    pub branch: Option<String>,
    /// SSH private key for ssh:// URLs ([source] ssh_key).
    #[arg(long, global = true, value_name = "PATH")]
    pub ssh_key: Option<PathBuf>,
    /// File holding an HTTPS token ([source] token_file).
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// libvirt URI ([libvirt] uri) [default: qemu:///system].
    #[arg(long, global = true, value_name = "URI")]
    pub connect: Option<String>,
    /// State directory: clone, record, lock ([agent] state_dir) [default: /var/lib/vmsync].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// This host's name for a VM's `hosts` ([agent] host) [default: hostname].
    #[arg(long, global = true)]
    pub host: Option<String>,
    /// Allowed root for disks and directories; repeat for several ([policy] disk_roots).
    #[arg(long = "disk-root", global = true, value_name = "DIR")]
    pub disk_roots: Vec<PathBuf>,
    /// Only apply commits signed by a key in this file (git's allowedSignersFile format)
    /// ([trust] allowed_signers).
    #[arg(long, global = true, value_name = "PATH")]
    pub allowed_signers: Option<PathBuf>,
    /// Change probe: an http(s) URL of the repository's `info/refs`; the fetch is skipped
    /// while it names the tip already fetched ([source] probe_url).
    #[arg(long, global = true, value_name = "URL")]
    pub probe_url: Option<String>,
    /// With --once: accept a commit that does not descend from the last applied one (a
    /// force-push that rewound or replaced history). The signature is still checked.
    #[arg(long)]
    pub allow_rewind: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// With --once: try the held back definition of VM again (one that a health check
    /// reverted); repeat for several.
    #[arg(long, value_name = "VM")]
    pub retry: Vec<String>,
    /// With --once: print the plan (like `vmsync plan`) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --once --dry-run: print the plan as JSON.
    #[arg(long)]
    pub json: bool,
    /// With --once: apply a commit that prunes every managed domain, or more than
    /// `policy.max_prune` of them.
    #[arg(long)]
    pub allow_mass_prune: bool,
    /// With --once or plan: restarts, stops and prunes do not wait for a maintenance
    /// window ([[window]] in the VM repository); for emergencies.
    #[arg(long, global = true)]
    pub ignore_windows: bool,
    /// Put drifted domains back to the commit ([policy] self_heal) [default: true].
    #[arg(long, global = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub self_heal: Option<bool>,
    /// Undefine tagged domains no longer in the manifest ([policy] prune) [default: false].
    #[arg(long, global = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub prune: Option<bool>,
    /// Refuse a commit pruning more domains than this ([policy] max_prune) [default: 5].
    #[arg(long, global = true, value_name = "N")]
    pub max_prune: Option<usize>,
    /// Default graceful-shutdown timeout ([policy] shutdown_timeout) [default: 120s].
    #[arg(long, global = true, value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch, validate and print what a sync would do; changes nothing.
    Plan {
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the last applied commit and each managed VM's state.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write a VM repository from the domains, networks and storage pools the host has
    /// now (reads only; changes nothing on the host). Review it, commit it; `adopt =
    /// true` takes them over.
    Import {
        /// Directory to write (must be empty unless --force).
        dir: PathBuf,
        /// Only these domains, networks or pools [default: every persistent one].
        names: Vec<String>,
        /// Write into a directory that is not empty (files of the same name are replaced).
        #[arg(long)]
        force: bool,
    },
    /// Stop applying commits to this host (or one VM) until `vmsync resume` or --until:
    /// still fetched and planned, drift reported, not healed. The daemon picks it up at
    /// its next tick.
    Suspend {
        /// Why (shown in status, plan, metrics and the commit status).
        #[arg(long)]
        reason: String,
        /// When it ends: a duration ("2h") or a time ("2026-12-06T18:00:00Z", "2026-12-06 18:00").
        #[arg(long, value_name = "DURATION|TIME")]
        until: Option<String>,
        /// Only this VM [default: the whole host].
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
    },
    /// Lift `vmsync suspend` (of the host, or of --vm NAME).
    Resume {
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
    },
    /// Shut the managed running VMs down in reverse dependency order (dependents first,
    /// independent ones in parallel), each gracefully within its shutdown_timeout and
    /// destroyed after it; for host shutdown (vmsync-shutdown.service). Exit 0 when all
    /// are off, 1 when one could not be stopped or libvirt is unreachable.
    Shutdown,
    /// Validate a VM repository checkout offline (for the VM repo's own CI); exit 0 or 3.
    Validate {
        /// The checkout [default: .].
        dir: Option<PathBuf>,
    },
    /// Print the domain XML of VMs as vmsync would define them (a template rendered with
    /// `host` = --host or this machine's name), after validating the checkout like
    /// `validate`; exit 0, 3 when invalid, 2 for a VM not in the manifest.
    Render {
        /// `[DIR] VM...`: DIR (default: .) when there are two or more arguments and the
        /// first is a directory; then one or more VM names.
        #[arg(value_name = "DIR|VM", required = true)]
        args: Vec<String>,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(std::env::var("VMSYNC_LOG").ok().as_deref());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_target(false);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).init(),
        // Under journald the journal stamps each line itself, and takes its priority
        // from a `<N>` prefix.
        LogFormat::Text if stderr_is_journal() => {
            let plain = tracing_subscriber::fmt::format()
                .without_time()
                .with_target(false);
            registry
                .with(layer.event_format(Journald(plain)).with_filter(filter))
                .init()
        }
        LogFormat::Text => registry.with(layer.with_filter(filter)).init(),
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` (`DEV:INODE`, set by systemd)
/// names it. A child started from a service inherits the variable but may log elsewhere.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", stderr.dev(), stderr.ino())
}

/// Text lines for journald: each line of an event starts with its syslog priority
/// (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug), so `journalctl -p` and the
/// colours of `systemctl status` follow the level, and a message of several lines (an
/// error's causes, an invalid commit's problems) keeps its priority on every line:
/// journald makes each line an entry of its own.
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut text = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut text),
            event,
        )?;
        let priority = syslog_priority(*event.metadata().level());
        for line in text.lines() {
            writeln!(writer, "<{priority}>{line}")?;
        }
        Ok(())
    }
}

fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        tracing::Level::DEBUG | tracing::Level::TRACE => 7,
    }
}

/// Colour in the log only on a terminal, and not when `NO_COLOR` is set (non-empty): a
/// pipe, a file or the journal gets no escape codes.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `VMSYNC_LOG`: comma-separated `level` or `target=level` directives (`debug`,
/// `info,vmsync::repo::source=trace`); unset or unparsable means `info`. (A plain target
/// filter: no regular-expression engine in the agent, see docs/performance.md.)
fn log_filter(spec: Option<&str>) -> tracing_subscriber::filter::Targets {
    spec.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    })
}

/// Logs an error's whole chain once: `error: …` then ` -> cause` lines, and returns its
/// exit status. A held lock is a normal outcome under a timer (another run does the
/// work): logged at INFO.
fn report(e: &SyncError) -> u8 {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message += &format!("\n -> {cause}");
        source = cause.source();
    }
    match e {
        SyncError::Locked(_) => {
            info!(
                exit_status = e.exit_code(),
                "{message}; this run does nothing"
            )
        }
        _ => error!("{message}"),
    }
    e.exit_code()
}

/// SIGTERM and SIGINT for `vmsync --once`: the first sets the returned flag (the sync's
/// `cancel`) and remembers the signal's number; a second one exits at once.
fn stop_on_signals() -> std::io::Result<(Arc<AtomicBool>, Arc<AtomicUsize>)> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let which = Arc::new(AtomicUsize::new(0));
    for signal in [SIGTERM, SIGINT] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, stop.clone())?;
        signal_hook::flag::register_usize(signal, which.clone(), signal as usize)?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    Ok((stop, which))
}

/// The exit status of a `--once` run that a signal stopped: 128 + its number when the
/// sync did not finish (some VM was interrupted), else the result's own.
fn once_status(result: &Result<(), SyncError>, stopped_by: usize) -> Option<u8> {
    let name = match stopped_by as i32 {
        signal_hook::consts::SIGTERM => "SIGTERM",
        signal_hook::consts::SIGINT => "SIGINT",
        _ => return None,
    };
    match result {
        Err(e @ SyncError::ActionsFailed { .. }) => {
            warn!(
                signal = name,
                "stopped before the sync finished: {e}; what was done is recorded, the next run continues"
            );
            u8::try_from(128 + stopped_by).ok()
        }
        _ => None,
    }
}

/// `vmsync plan` (and `--once --dry-run`): the suspensions in force, then the plan; in
/// JSON, the plan object with `suspended`.
fn print_plan(settings: &config::Settings, plan: &plan_types::Plan, json: bool) {
    let suspended = suspend::in_force(&settings.state_dir);
    if json {
        let mut value = serde_json::to_value(plan.to_json()).expect("plan serializes");
        value["suspended"] = suspended.to_json();
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("plan serializes")
        );
    } else {
        print!("{}", suspended.render_text());
        print!("{}", render::output(plan, false));
    }
}

/// What `vmsync --once` prints on stdout after a converged sync.
fn print_once(r: Report) {
    if let Some(host) = &r.held.host {
        println!(
            "host suspended {}: commit {} planned, not applied ({} change(s) waiting)",
            host.describe(),
            r.commit,
            r.held.changes
        );
        return;
    }
    for (vm, s) in &r.held.vms {
        println!(
            "  {vm}: suspended {}: its changes are planned, not applied",
            s.describe()
        );
    }
    if r.outcome.changes() == 0 {
        println!(
            "nothing to do: commit {} is applied and every vm is converged",
            r.commit
        );
    } else {
        println!(
            "applied commit {}: {} change(s)",
            r.commit,
            r.outcome.changes()
        );
        for vm in r.outcome.vms.iter().filter(|vm| !vm.done.is_empty()) {
            println!("  {}: {}", vm.name, vm.done.join(", "));
        }
    }
    for vm in r.outcome.vms.iter().filter(|vm| vm.pending_restart) {
        println!(
            "  {}: pending restart (running with an older definition)",
            vm.name
        );
    }
    print!("{}", render::render_extra(&r.outcome));
}

/// Parses the arguments, runs the command and returns the exit status.
pub fn run() -> u8 {
    // Packaging only (man pages, completions): not a clap command, so that neither
    // `--help` nor the completions offer it.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == generate::COMMAND) {
        return generate::main(&args[2..]);
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let flags = overrides(&cli);
    if let Err(e) = check_once_only_flags(&cli) {
        return report(&e);
    }
    let settings = match config::load(&flags) {
        Ok(s) => s,
        Err(e) => return report(&e.into()),
    };
    if let Err(e) = check_mode_flags(&cli) {
        return report(&e);
    }
    match (&cli.command, cli.once) {
        (None, true) if cli.dry_run => exit_status(
            sync::plan_only(&settings).map(|plan| print_plan(&settings, &plan, cli.json)),
        ),
        (None, true) => sync_once(&cli, &settings),
        (None, false) => daemon::run(flags, settings),
        (Some(_), true) => exit_status(Err(config_error(
            "--once cannot be combined with a command",
        ))),
        (Some(command), false) => exit_status(run_command(command, &settings)),
    }
}

/// The exit status of a finished command: 0, or the one its error maps to.
fn exit_status(result: Result<(), SyncError>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => report(&e),
    }
}

fn config_error(message: &str) -> SyncError {
    SyncError::Config(config::ConfigError(message.into()))
}

/// The flags that override the config file.
fn overrides(cli: &Cli) -> Overrides {
    Overrides {
        config: cli.config.clone(),
        url: cli.url.clone(),
        branch: cli.branch.clone(),
        ssh_key: cli.ssh_key.clone(),
        token_file: cli.token_file.clone(),
        connect: cli.connect.clone(),
        state_dir: cli.state_dir.clone(),
        host: cli.host.clone(),
        disk_roots: cli.disk_roots.clone(),
        self_heal: cli.self_heal,
        prune: cli.prune,
        max_prune: cli.max_prune,
        shutdown_timeout: cli.shutdown_timeout.clone(),
        allow_mass_prune: cli.allow_mass_prune,
        ignore_windows: cli.ignore_windows,
        allowed_signers: cli.allowed_signers.clone(),
        probe_url: cli.probe_url.clone(),
    }
}

/// `--retry` and `--allow-rewind` belong to `--once`, `--ignore-windows` to `--once` or
/// `plan`; checked before the config loads.
fn check_once_only_flags(cli: &Cli) -> Result<(), SyncError> {
    let syncing_once = cli.once && cli.command.is_none() && !cli.dry_run;
    if !cli.retry.is_empty() && !syncing_once {
        return Err(config_error("--retry is only accepted with --once"));
    }
    if cli.ignore_windows
        && !(cli.once && cli.command.is_none() || matches!(cli.command, Some(Command::Plan { .. })))
    {
        return Err(config_error("--ignore-windows goes with --once or plan"));
    }
    if cli.allow_rewind && !(cli.once && cli.command.is_none()) {
        return Err(config_error("--allow-rewind is only accepted with --once"));
    }
    Ok(())
}

/// `--dry-run`, `--allow-mass-prune` and `--json` belong to a mode; checked after the
/// config loads.
fn check_mode_flags(cli: &Cli) -> Result<(), SyncError> {
    if (cli.dry_run || cli.allow_mass_prune) && !(cli.once && cli.command.is_none()) {
        return Err(config_error(
            "--dry-run and --allow-mass-prune go with --once",
        ));
    }
    if cli.json && !(cli.once && cli.dry_run) {
        return Err(config_error(
            "--json goes with --once --dry-run (or use `vmsync plan --json`)",
        ));
    }
    Ok(())
}

/// `vmsync --once`: one sync that stops like the daemon on a signal, its events flushed.
fn sync_once(cli: &Cli, settings: &config::Settings) -> u8 {
    let (stop, which) = match stop_on_signals() {
        Ok(flags) => flags,
        Err(e) => {
            error!("failed to install signal handlers: {e}");
            return 1;
        }
    };
    let notifier = (!settings.notify.is_empty())
        .then(|| notify::Notifier::start(&settings.state_dir, &settings.host, &settings.notify));
    let events = notifier.as_ref().map(notify::SyncEvents::new);
    let result = sync::run(
        settings,
        &mut sync::Connection::new(&settings.libvirt_uri),
        &sync::Options {
            give_up_after: None,
            cancel: &stop,
            allow_rewind: cli.allow_rewind,
            retry: &cli.retry,
            events: events.as_ref(),
        },
    )
    .map(print_once);
    if let Some(notifier) = &notifier {
        notifier.flush(notify::ONCE_WAIT);
    }
    if let Some(status) = once_status(&result, which.load(Ordering::SeqCst)) {
        return status;
    }
    exit_status(result)
}

/// A subcommand (plan, status, suspend, resume, validate, render, import).
fn run_command(command: &Command, settings: &config::Settings) -> Result<(), SyncError> {
    match command {
        Command::Plan { json } => sync::plan_only(settings).map(|mut plan| {
            health_stage::warn_in_plan(&mut plan, &settings.state_dir);
            print_plan(settings, &plan, *json)
        }),
        Command::Suspend { reason, until, vm } => {
            suspend_cmd(settings, vm.as_deref(), reason, until.as_deref())
        }
        Command::Resume { vm } => resume_cmd(settings, vm.as_deref()),
        Command::Validate { dir } => {
            let dir = dir.clone().unwrap_or_else(|| PathBuf::from("."));
            sync::validate_dir(settings, &dir).map(|d| {
                println!(
                    "{}: valid ({} vm(s), {} directory(ies))",
                    dir.display(),
                    d.vms.len(),
                    d.directories.len()
                );
                print!("{}", network_pool_entries::validate_summary(&d.resources));
            })
        }
        Command::Render { args } => render_cmd::render(settings, args).map(|text| print!("{text}")),
        Command::Import { dir, names, force } => import::import(settings, dir, names, *force)
            .map(|done| print!("{}", import::render(dir, &done))),
        Command::Status { json } => print_status(settings, *json),
        Command::Shutdown => shutdown_cmd(settings),
    }
}

/// `vmsync shutdown`: one line per VM on stdout; exit 1 when one is not off.
fn shutdown_cmd(settings: &config::Settings) -> Result<(), SyncError> {
    let record = store::load(&settings.state_dir).map_err(SyncError::Other)?;
    let hv = hypervisor::Libvirt::connect(&settings.libvirt_uri)?;
    let running = shutdown::running_managed(&hv, &record)
        .map_err(|e| SyncError::Other(anyhow::anyhow!("failed to list the domains: {e}")))?;
    let waves = shutdown::waves(&record, &running, settings.changes.shutdown_timeout);
    let done = shutdown::run(&hv, &waves, &AtomicBool::new(false));
    let mut failed = 0;
    for vm in &done {
        match &vm.result {
            Ok(how) => println!("{}: {how}", vm.name),
            Err(e) => {
                failed += 1;
                println!("{}: not stopped: {e}", vm.name);
            }
        }
    }
    if done.is_empty() {
        println!("no managed vm is running");
    }
    if failed > 0 {
        return Err(SyncError::Other(anyhow::anyhow!(
            "{failed} of {} vm(s) could not be shut down",
            done.len()
        )));
    }
    Ok(())
}

/// "vm 'web'" or "host": what a suspend or resume is about.
fn suspend_target(vm: Option<&str>) -> String {
    vm.map(|v| format!("vm '{v}'"))
        .unwrap_or_else(|| "host".into())
}

/// `vmsync suspend`.
fn suspend_cmd(
    settings: &config::Settings,
    vm: Option<&str>,
    reason: &str,
    until: Option<&str>,
) -> Result<(), SyncError> {
    suspend::suspend(&settings.state_dir, vm, reason, until)
        .map(|s| {
            println!(
                "{} suspended {}: commits are fetched and planned, not applied",
                suspend_target(vm),
                s.describe()
            );
        })
        .map_err(|e| SyncError::Config(config::ConfigError(e)))
}

/// `vmsync resume`.
fn resume_cmd(settings: &config::Settings, vm: Option<&str>) -> Result<(), SyncError> {
    suspend::resume(&settings.state_dir, vm)
        .map(|(lifted, left)| {
            let what = suspend_target(vm);
            match lifted {
                Some(s) => println!("{what} resumed (was suspended {})", s.describe()),
                None => println!("{what} was not suspended"),
            }
            print!("{}", left.render_text());
        })
        .map_err(|e| SyncError::Config(config::ConfigError(e)))
}

/// `vmsync status`: the record beside what libvirt says, then the suspensions in force.
fn print_status(settings: &config::Settings, json: bool) -> Result<(), SyncError> {
    let record = store::load(&settings.state_dir).map_err(SyncError::Other)?;
    let hv = hypervisor::Libvirt::connect(&settings.libvirt_uri);
    let hv_ref = hv
        .as_ref()
        .map(|h| h as &dyn hypervisor::Hypervisor)
        .map_err(Clone::clone);
    let mut status = status::status(&record, hv_ref);
    status::check_local_state(&mut status, &record, &settings.state_dir);
    let suspended = suspend::in_force(&settings.state_dir);
    if json {
        let mut value = serde_json::to_value(&status).expect("status serializes");
        value["suspended"] = suspended.to_json();
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("status serializes")
        );
    } else {
        print!("{}", status::render_text(&status));
        print!("{}", suspended.render_text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Journald, colour, log_filter};
    use std::ffi::OsStr;
    use std::sync::{Arc, Mutex};
    use tracing::Level;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None), "a pipe, a file, the journal");
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "NO_COLOR= (empty) is unset"
        );
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journald_lines_carry_their_event_priority() {
        use tracing_subscriber::prelude::*;
        let out = Capture::default();
        let make = {
            let out = out.clone();
            move || out.clone()
        };
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_target(false);
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(make)
                .event_format(Journald(format)),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(failures = 2, "sync failed:\n -> cause");
            tracing::warn!(vm = "web", "not done");
            tracing::info!(vm = "web", "done");
            tracing::debug!("detail");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "<3>ERROR sync failed:",
                "<3> -> cause failures=2",
                "<4> WARN not done vm=\"web\"",
                "<6> INFO done vm=\"web\"",
                "<7>DEBUG detail",
            ],
            "{text}"
        );
    }

    #[test]
    fn log_filter_takes_levels_and_targets_and_defaults_to_info() {
        let default = log_filter(None);
        assert!(default.would_enable("vmsync::agent::sync", &Level::INFO));
        assert!(!default.would_enable("vmsync::agent::sync", &Level::DEBUG));

        let debug = log_filter(Some("debug"));
        assert!(debug.would_enable("vmsync::agent::sync", &Level::DEBUG));
        assert!(!debug.would_enable("vmsync::agent::sync", &Level::TRACE));

        let per_target = log_filter(Some("warn,vmsync::repo::source=trace"));
        assert!(per_target.would_enable("vmsync::repo::source", &Level::TRACE));
        assert!(!per_target.would_enable("vmsync::agent::sync", &Level::INFO));
        assert!(per_target.would_enable("vmsync::agent::sync", &Level::WARN));

        // Unparsable: the default, not silence.
        let bad = log_filter(Some("vmsync=loud"));
        assert!(bad.would_enable("vmsync::agent::sync", &Level::INFO));
        assert!(!bad.would_enable("vmsync::agent::sync", &Level::DEBUG));
    }
}
