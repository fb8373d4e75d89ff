//! The original package's API: the class `pylocksfile`, a drop-in for
//! `pylocksfile.pylocksfile` 0.0.6 (same calls, same answers), over the
//! same core as `LocksFile`.

mod args;
pub mod fastcall;
pub mod pylocksfile;
mod words;
