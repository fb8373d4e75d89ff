//! `LocksFile`: the API for new code, with guards, timeouts and typed errors.
//!
//! From the ground up: `outcomes` (refusals and closed-file errors),
//! `guard` (a lock held until released), `tasks` and `thread_owners` (who
//! a take is for), `owner` (the state the class shares with its guards and
//! waits, and the one path of every blocking take), `async_wait` (one
//! asyncio wait), `locks_file` (the Python class), `shm_table`.

mod async_wait;
mod fastcall;
mod guard;
mod handle;
mod locks_file;
mod outcomes;
mod owner;
mod pickling;
mod shm_table;
mod stats;
mod tasks;
mod thread_owners;

pub use fastcall::install as install_fastcall;
pub use guard::PyGuard;
pub use locks_file::PyLocksFile;
pub use shm_table::{_cap_shm_for_tests, _shm_table};
