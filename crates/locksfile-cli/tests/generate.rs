//! `locksfile completions` and `locksfile man`: generated from the command
//! line definition, printed by the installed binary.

mod common;

use common::*;

#[test]
fn completions_cover_the_subcommands_and_their_options() {
    let out = run(&["completions", "bash"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let script = stdout(&out);
    assert!(script.contains("_locksfile()"), "{script}");
    for word in [
        "run",
        "status",
        "race",
        "--no-fork",
        "--unlock",
        "--command",
        // The modes, `shm` included, are offered where a mode is taken.
        "ofd process flock shm",
    ] {
        assert!(script.contains(word), "no {word} in:\n{script}");
    }
    // bash itself accepts it.
    let check = std::process::Command::new("bash")
        .args(["-n", "-c", &script])
        .output();
    if let Ok(check) = check {
        assert!(check.status.success(), "{}", stderr(&check));
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert_eq!(code(&out), 0, "{shell}: {}", stderr(&out));
        assert!(stdout(&out).contains("locksfile"), "{shell}");
    }
    assert_eq!(code(&run(&["completions", "tcsh"])), 64);
}

#[test]
fn man_pages_for_the_command_and_each_subcommand() {
    let out = run(&["man"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains(".TH locksfile 1"), "{page}");
    assert!(page.contains("locksfile\\-run(1)"), "{page}");

    let out = run(&["man", "run"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains(".TH locksfile-run 1"), "{page}");
    for option in [
        "\\-\\-no\\-fork",
        "\\-\\-unlock",
        "\\-\\-command",
        "Exit status",
        "\\-\\-mode shm",
    ] {
        assert!(page.contains(option), "no {option} in:\n{page}");
    }
    assert_eq!(code(&run(&["man", "frobnicate"])), 64);
}
