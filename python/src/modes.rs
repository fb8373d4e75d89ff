//! Lock modes as Python code names them: the core's names (`Mode::name`,
//! `FromStr`), never spelled again here.

use locksfile::Mode;

/// The modes a lock file opens in, in the order messages name them
/// (`Mode::Postgres` is a server target's, never asked for by name).
pub const FILE_MODES: [Mode; 4] = [Mode::Ofd, Mode::Process, Mode::Flock, Mode::Shm];

/// The mode of `modes` named `name`, if any.
pub fn find_mode(modes: &[Mode], name: &str) -> Option<Mode> {
    name.parse().ok().filter(|m| modes.contains(m))
}

/// `"a", "b" or "c"`: the names of `modes`, for a message.
pub fn one_of(modes: &[Mode]) -> String {
    let names: Vec<String> = modes.iter().map(|m| format!("\"{m}\"")).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A file mode's name as Python code passes it.
pub fn parse_mode(name: &str) -> Result<Mode, String> {
    find_mode(&FILE_MODES, name)
        .ok_or_else(|| format!("mode must be {}, got {name:?}", one_of(&FILE_MODES)))
}
