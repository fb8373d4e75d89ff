//! Lock file paths: what can name one.

/// Refuse paths that cannot name a lock file, with a message that says
/// why, before anything is opened: `""` (`os.path.abspath` made it the
/// working directory; the kernel answers `ENOENT`) and a trailing `/`
/// (`os.path.abspath` dropped it and opened the file; the kernel answers
/// `EISDIR` or `ENOTDIR`). Checked on the bytes the kernel will see, so
/// names that are not UTF-8 (`os.fsdecode`'s surrogate escapes) pass.
pub fn check_path(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        Err("the lock file path is empty".to_string())
    } else if bytes.ends_with(b"/") {
        Err(format!(
            "the lock file path {:?} ends with '/': it names a directory, not a file",
            path.display()
        ))
    } else {
        Ok(())
    }
}
