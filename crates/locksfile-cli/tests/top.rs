//! `locksfile top` in a real terminal: tmux runs it, `capture-pane` reads
//! the screen, `send-keys` types. Each test has its own tmux server
//! (`-L`), killed on drop.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn lock_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.lock");
    (dir, path)
}

/// One tmux server with one session running `cmd` in a 120x40 window.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cmd: &str) -> Tmux {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let socket = format!(
            "locksfile-top-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let t = Tmux { socket };
        let st = t
            .tmux()
            .args([
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "120",
                "-y",
                "40",
                cmd,
            ])
            .status()
            .expect("run tmux (scripts/setup installs it)");
        assert!(st.success(), "tmux new-session failed");
        t
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        // No user configuration: the window size and keys are as given.
        c.args(["-L", &self.socket, "-f", "/dev/null"]);
        c.stdin(Stdio::null());
        c
    }

    fn screen(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Poll the screen until `pred` holds; the last screen on failure.
    fn await_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < until, "never saw {what}; the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let st = self
            .tmux()
            .args(["send-keys", "-t", "top"])
            .args(keys)
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn alive(&self) -> bool {
        self.tmux()
            .args(["has-session", "-t", "top"])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// The pid of the program the pane's shell runs (top).
    fn top_pid(&self) -> u32 {
        let out = self
            .tmux()
            .args(["display-message", "-p", "-t", "top", "#{pane_pid}"])
            .output()
            .unwrap();
        let sh: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let children =
            std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("pane shell {sh} has no child"))
            .parse()
            .unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .tmux()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// top on `file`, then, in the same terminal, how it exited and the
/// terminal's line discipline flags (raw mode shows `-icanon -echo`).
fn top_then_stty(file: &std::path::Path) -> String {
    format!(
        "{BIN} top {} --interval 0.2; r=$?; echo \"top exited $r, tty: $(stty -a | \
         tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' ')\"; \
         read x",
        file.display()
    )
}

/// A `locksfile run` blocked on `index` of `file` until it is killed.
struct Waiter(Child);

impl Waiter {
    fn start(file: &std::path::Path, opts: &[&str]) -> Waiter {
        let child = locksfile()
            .arg("run")
            .args(opts)
            .arg(file)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Waiter(child)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The line of the screen for a lock on `index` by `pid`.
fn row<'a>(screen: &'a str, index: &str, pid: u32) -> Option<&'a str> {
    let pid = pid.to_string();
    screen.lines().find(|l| {
        let cells: Vec<&str> = l.split_whitespace().collect();
        cells.first() == Some(&index) && cells.contains(&pid.as_str())
    })
}

/// The screen once top shows the holder and a waiter that has been seen
/// waiting across refreshes, then `q`: the checks of both modes.
fn shows_holder_and_waiter_then_quits(mode: &str, shown: &str) {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["--mode", mode, "-i", "3"]);
    let w = Waiter::start(&f, &["--mode", mode, "-i", "3"]);
    let wpid = w.0.id();
    await_lock(&f, |l| l["state"] == "waiting" && l["pid"] == wpid);

    let t = Tmux::start(&top_then_stty(&f));
    let screen = t.await_screen("the holder, the waiter and a wait histogram", |s| {
        let waited = row(s, "3", wpid).is_some_and(|l| l.contains(">= ") && !l.contains(">= 0s"));
        row(s, "3", h.pid()).is_some() && waited && s.contains(" |#")
    });
    let held = row(&screen, "3", h.pid()).unwrap();
    assert!(
        held.contains("exclusive") && held.contains(shown) && held.contains("locksfile (sh -c"),
        "{screen}"
    );
    assert!(screen.contains("HOLDERS (1)"), "{screen}");
    assert!(screen.contains("WAITERS (1)"), "{screen}");
    assert!(screen.contains("q quits"), "{screen}");
    // The hottest locks panel lists index 3 as seen held and waited for.
    let hot_at = screen.find("HOTTEST LOCKS").expect(&screen);
    let hot = screen[hot_at..]
        .lines()
        .find(|l| l.starts_with("3 "))
        .unwrap_or_else(|| panic!("index 3 not among the hottest:\n{screen}"));
    let n: Vec<u64> = hot
        .split_whitespace()
        .skip(1)
        .take(2)
        .map(|c| c.parse().unwrap())
        .collect();
    assert!(n[0] >= 2 && n[1] >= 2, "{screen}");

    t.keys(&["q"]);
    let after = t.await_screen("top's exit", |s| s.contains("top exited"));
    // The line discipline is back (cooked, echoing) and the alternate
    // screen is gone with top's frame.
    assert!(
        after.contains("top exited 0, tty: icanon echo"),
        "terminal left raw:\n{after}"
    );
    assert!(!after.contains("HOLDERS"), "frame left on screen:\n{after}");
    t.keys(&["Enter"]);
    let until = Instant::now() + Duration::from_secs(10);
    while t.alive() {
        assert!(Instant::now() < until, "the pane never closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(w);
    h.release();
}

#[test]
fn ofd_holder_and_waiter_on_screen_and_q_quits() {
    shows_holder_and_waiter_then_quits("ofd", "OFD");
}

#[test]
fn shm_holder_and_waiter_on_screen_and_q_quits() {
    shows_holder_and_waiter_then_quits("shm", "SHM");
}

#[test]
fn terminating_signals_restore_the_terminal() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGHUP, 129), (libc::SIGINT, 0)] {
        let (_d, f) = lock_file();
        let h = Holder::start(&f, &["-i", "3"]);
        let t = Tmux::start(&top_then_stty(&f));
        t.await_screen("the holder", |s| row(s, "3", h.pid()).is_some());
        let pid = t.top_pid();
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
        let after = t.await_screen("top's exit", |s| s.contains("top exited"));
        assert!(
            after.contains(&format!("top exited {code}, tty: icanon echo")),
            "signal {sig}: {after}"
        );
        assert!(!after.contains("HOLDERS"), "{after}");
        h.release();
    }
}

#[test]
fn ctrl_c_quits() {
    let (_d, f) = lock_file();
    std::fs::write(&f, "").unwrap();
    let t = Tmux::start(&top_then_stty(&f));
    t.await_screen("the frame", |s| s.contains("HOLDERS (0)"));
    t.keys(&["C-c"]);
    let after = t.await_screen("top's exit", |s| s.contains("top exited"));
    assert!(after.contains("top exited 0, tty: icanon echo"), "{after}");
}

#[test]
fn the_frame_fits_a_resized_window() {
    let (_d, f) = lock_file();
    let holders: Vec<Holder> = (0..12)
        .map(|i| Holder::start(&f, &["-i", &i.to_string()]))
        .collect();
    let t = Tmux::start(&top_then_stty(&f));
    t.await_screen("every holder", |s| s.contains("HOLDERS (12)"));
    let st = t
        .tmux()
        .args(["resize-window", "-t", "top", "-x", "50", "-y", "16"])
        .status()
        .unwrap();
    assert!(st.success());
    let s = t.await_screen("a frame cut to 16 rows", |s| s.contains(" more"));
    assert!(s.lines().count() <= 16, "{s}");
    assert!(s.lines().all(|l| l.chars().count() <= 50), "{s}");
    assert!(s.contains("HOLDERS (12)"), "{s}");
    drop(holders);
}

#[test]
fn once_and_a_pipe_print_one_plain_frame() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["-i", "3"]);
    for args in [&["top", "--once"][..], &["top"][..]] {
        let mut a = args.to_vec();
        a.push(f.to_str().unwrap());
        let out = run(&a);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let text = stdout(&out);
        assert!(!text.contains('\x1b'), "terminal control in:\n{text}");
        assert!(row(&text, "3", h.pid()).is_some(), "{text}");
        assert!(
            text.contains("HOLDERS (1)") && text.contains("WAITERS (0)"),
            "{text}"
        );
    }
    h.release();
}

#[test]
fn refuses_what_is_no_lock_file() {
    let (d, f) = lock_file();
    let out = run(&["top", "--once", f.to_str().unwrap()]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("cannot look at"), "{}", stderr(&out));
    let out = run(&["top", "--once", d.path().to_str().unwrap()]);
    assert_ne!(code(&out), 0);
    let out = run(&["top", "--interval", "0", "x"]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("interval"), "{}", stderr(&out));
}

/// A lock namespace on the test's PostgreSQL server, when there is one.
fn server_target() -> Option<String> {
    Some(format!("{}?name=cli-top-{}", server()?, std::process::id()))
}

#[test]
fn a_server_namespace_s_sessions_on_screen() {
    let Some(t) = server_target() else { return };
    let target = std::path::Path::new(&t);
    let h = Holder::start(target, &["-i", "3"]);
    let w = Waiter::start(target, &["-i", "3"]);
    let app = |pid: u32| format!("locksfile pid {pid}");
    // Each session is named by its backend pid, and the command by the
    // client's application name (`locksfile pid N`).
    let frame_until = |pred: &dyn Fn(&str) -> bool| {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run(&["top", "--once", &t]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            let text = stdout(&out);
            if pred(&text) {
                return text;
            }
            assert!(Instant::now() < until, "{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let text = frame_until(&|s: &str| s.contains(&app(w.0.id())));
    let held = text
        .lines()
        .find(|l| l.starts_with("3 ") && l.contains(&app(h.pid())))
        .unwrap_or_else(|| panic!("no holder row:\n{text}"));
    assert!(
        held.contains(" PG ") && held.contains("exclusive"),
        "{text}"
    );
    assert!(
        text.contains("HOLDERS (1)") && text.contains("WAITERS (1)"),
        "{text}"
    );
    // The target is shown without its password, as the handle names it.
    assert!(text.starts_with("locksfile top: "), "{text}");
    drop(w);
    assert_eq!(h.release(), 0);
}
