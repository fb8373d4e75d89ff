//! `locksfile`: run a command under a byte-range lock, show who holds
//! the locks of a file, and race processes around a ring of locks.
//!
//! Conventions follow util-linux `flock(1)` and `lslocks(8)` where they
//! fit; exit codes are listed in [`exit`].
#![deny(unsafe_code)]

mod doctor;
mod exit;
mod generate;
mod pg;
mod procfs;
mod race;
mod run;
mod span_arg;
mod stats;
mod status;
mod sys;
mod top;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};

/// Named, file-backed, byte-range reader/writer locks: lock N is byte N of FILE.
#[derive(Parser, Debug)]
#[command(
    name = "locksfile",
    version,
    propagate_version = true,
    after_help = TOP_NOTES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const TOP_NOTES: &str = "\
flock(1)'s command line works without the word run: `locksfile [OPTIONS] FILE
COMMAND...` and `locksfile [OPTIONS] FILE -c CMD` are `locksfile run ...`
(`locksfile -n data.lock -c 'make'`). A first argument that names a
subcommand is one: give a FILE named like one as ./run, or after an option.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Run COMMAND while holding a lock on some indices of FILE.
    Run(run::RunArgs),
    /// Show every lock held on FILE and every process waiting for one.
    Status(status::StatusArgs),
    /// Show the lock statistics of FILE's shm lock table (--json, --prometheus).
    Stats(stats::StatsArgs),
    /// Race processes hand-over-hand around a ring of locks and verify them.
    Race(race::RaceArgs),
    /// Check FILE (or a server) for hazards that silently break exclusion.
    Doctor(doctor::DoctorArgs),
    /// Set up a PostgreSQL database for lock namespaces (a DBA's step).
    Pg(pg::PgArgs),
    /// A live view of FILE's holders, waiters and their waits; q quits.
    Top(top::TopArgs),
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions(generate::CompletionsArgs),
    /// Print the man page of locksfile, or of one SUBCOMMAND, in roff.
    Man(generate::ManArgs),
}

/// Words that name a subcommand (or clap's help) in the first place.
const SUBCOMMANDS: &[&str] = &[
    "run",
    "status",
    "stats",
    "race",
    "doctor",
    "pg",
    "top",
    "completions",
    "man",
    "help",
];

/// flock(1)'s command line, `locksfile [OPTIONS] FILE COMMAND...` or
/// `locksfile [OPTIONS] FILE -c CMD`, is `run`'s: when the first argument
/// names no subcommand and is not the top-level help or version, `run` is
/// put in front of it.
fn with_implied_run(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let implied = match args.get(1).and_then(|a| a.to_str()) {
        None => false,
        Some(first) => {
            !SUBCOMMANDS.contains(&first) && !matches!(first, "-h" | "--help" | "-V" | "--version")
        }
    };
    // An argument that is not UTF-8 is no subcommand either.
    if implied || args.get(1).is_some_and(|a| a.to_str().is_none()) {
        args.insert(1, "run".into());
    }
    args
}

fn main() {
    let cli = match Cli::try_parse_from(with_implied_run(std::env::args_os().collect())) {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => exit::USAGE,
            };
            // Printing help can only fail on a closed stdout; nothing to add then.
            let _ = e.print();
            std::process::exit(code);
        }
    };
    sys::default_sigpipe();
    let code = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Status(args) => status::main(args),
        Command::Stats(args) => stats::main(args),
        Command::Race(args) => race::main(args),
        Command::Doctor(args) => doctor::main(args),
        Command::Pg(args) => pg::main(args),
        Command::Top(args) => top::main(args),
        Command::Completions(args) => generate::completions(Cli::command(), args),
        Command::Man(args) => generate::man(Cli::command(), args),
    };
    std::process::exit(code);
}
