//! `locksfile pg`: what a database administrator runs once so that roles
//! without `CREATE` can take locks on a PostgreSQL server (see
//! `docs/POSTGRES.md`).

use clap::{Args, Subcommand};

use crate::exit;

#[derive(Args, Debug)]
pub struct PgArgs {
    #[command(subcommand)]
    command: PgCommand,
}

#[derive(Subcommand, Debug)]
enum PgCommand {
    /// Create the lock tables in the target's database (idempotent) and,
    /// with --role, grant that role what it needs and no more.
    Setup(SetupArgs),
}

#[derive(Args, Debug)]
struct SetupArgs {
    /// The database, as a postgresql:// URL or a libpq key=value string
    /// (name= may be left out), for a user that may create tables there.
    target: Option<String>,
    /// The role applications connect as: granted SELECT, INSERT on the
    /// namespace table and its sequence's USAGE, SELECT, INSERT, UPDATE on
    /// the fencing table.
    #[arg(long)]
    role: Option<String>,
    /// Print the SQL instead of running it (no connection is made).
    #[arg(long)]
    print: bool,
}

pub fn main(args: PgArgs) -> i32 {
    match args.command {
        PgCommand::Setup(a) => setup(a),
    }
}

fn setup(a: SetupArgs) -> i32 {
    if a.print {
        print!("{}", locksfile::server_setup_sql(a.role.as_deref()));
        return 0;
    }
    let Some(target) = a.target else {
        eprintln!("locksfile: pg setup needs a TARGET (or --print)");
        return exit::USAGE;
    };
    match locksfile::set_up_server(&target, a.role.as_deref()) {
        Ok(()) => {
            match &a.role {
                Some(r) => eprintln!("locksfile: the lock tables are ready; {r:?} may take locks"),
                None => eprintln!("locksfile: the lock tables are ready"),
            }
            0
        }
        Err(e) => {
            eprintln!("locksfile: {e}");
            exit::for_lock_error(&e)
        }
    }
}
