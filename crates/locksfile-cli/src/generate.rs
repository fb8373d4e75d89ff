//! `locksfile completions SHELL` and `locksfile man [SUBCOMMAND]`: shell
//! completion scripts and man pages generated from the command line
//! definition itself (`clap_complete`, `clap_mangen`), so an installed
//! binary can always produce the ones that match it.

use std::io::Write;

use clap::Args;
use clap_complete::Shell;

use crate::exit;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// The subcommand whose page to print (locksfile-SUBCOMMAND(1));
    /// without it, locksfile(1).
    #[arg(value_name = "SUBCOMMAND")]
    subcommand: Option<String>,
}

/// Print the completion script for `args.shell` to stdout.
pub fn completions(mut cmd: clap::Command, args: CompletionsArgs) -> i32 {
    let name = cmd.get_name().to_string();
    clap_complete::generate(args.shell, &mut cmd, name, &mut std::io::stdout());
    0
}

/// Print a man page, in roff, to stdout.
pub fn man(mut cmd: clap::Command, args: ManArgs) -> i32 {
    // Building sets each subcommand's display name (`locksfile-run`), which
    // its page is titled with and the main page's list refers to.
    cmd.build();
    let page = match &args.subcommand {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                eprintln!("locksfile: no subcommand '{name}' to print a man page for");
                return exit::USAGE;
            }
        },
    };
    let mut roff = Vec::new();
    if let Err(e) = clap_mangen::Man::new(page).render(&mut roff) {
        eprintln!("locksfile: rendering the man page: {e}");
        return exit::SOFTWARE;
    }
    match std::io::stdout().write_all(&roff) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("locksfile: writing the man page: {e}");
            exit::OSERR
        }
    }
}
