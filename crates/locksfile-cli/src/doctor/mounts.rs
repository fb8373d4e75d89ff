//! Which file system a file is on, and how it is mounted:
//! `/proc/self/mountinfo`, one mount a line (proc(5)):
//!
//! ```text
//! 36 35 0:52 / /mnt/data rw,relatime shared:1 - nfs4 srv:/data rw,vers=4.2,local_lock=none
//! ```
//!
//! (mount id, parent id, device major:minor, root within the file system,
//! mount point, per-mount options, optional fields, `-`, type, source, the
//! file system's own options).

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    pub mount_point: String,
    /// `nfs4`, `ext4`, `fuse.sshfs`, ...
    pub fs_type: String,
    pub source: String,
    /// The per-mount options, then the file system's own.
    pub options: Vec<String>,
}

impl Mount {
    /// The value of option `name` (`Some("")` for a flag without one).
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.iter().find_map(|o| match o.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if o == name => Some(""),
            _ => None,
        })
    }
}

/// mountinfo writes space, tab, newline and backslash in paths as octal
/// escapes (`\040`).
fn unescaped(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse one mountinfo line; `None` for one that is not well formed.
pub fn parse_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let mut b = before.split(' ');
    let _id = b.next()?;
    let _parent = b.next()?;
    let (major, minor) = b.next()?.split_once(':')?;
    let _root = b.next()?;
    let mount_point = unescaped(b.next()?);
    let mount_opts = b.next()?;
    let mut a = after.split(' ');
    let fs_type = a.next()?.to_string();
    let source = unescaped(a.next()?);
    let super_opts = a.next().unwrap_or("");
    let options = mount_opts
        .split(',')
        .chain(super_opts.split(','))
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .collect();
    Some(Mount {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point,
        fs_type,
        source,
        options,
    })
}

/// The mount of the file whose device is `major:minor` and whose absolute
/// path is `path`, from mountinfo text: of the mounts of that device, the
/// one whose mount point is the longest prefix of `path`.
pub fn mount_of(mountinfo: &str, major: u32, minor: u32, path: &str) -> Option<Mount> {
    let under = |m: &Mount| {
        let mp = m.mount_point.trim_end_matches('/');
        path == mp || path.starts_with(&format!("{mp}/"))
    };
    let mut of_dev: Vec<Mount> = mountinfo
        .lines()
        .filter_map(parse_line)
        .filter(|m| (m.major, m.minor) == (major, minor))
        .collect();
    of_dev.sort_by_key(|m| std::cmp::Reverse((under(m), m.mount_point.len())));
    of_dev.into_iter().next()
}

/// How a file system type bears on locks shared between processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// A local file system: the kernel's locks are the only ones.
    Local,
    /// Shared by several machines, with locks that reach the others
    /// (depending on mount options checked apart).
    Network,
    /// Shared by several machines (or reachable under another name),
    /// with locks that stay on this machine.
    LocalLocksOnly,
}

/// What a file system type means for locks, and why.
pub fn reach(fs_type: &str) -> (Reach, &'static str) {
    let base = fs_type.split('.').next().unwrap_or(fs_type);
    match base {
        "nfs" | "nfs4" => (
            Reach::Network,
            "NFS: fcntl locks go to the server's lock manager (NLM, or NFSv4's \
             own) and reach every client, unless the mount keeps them local; \
             flock(2) is sent as a whole-file fcntl lock",
        ),
        "cifs" | "smb3" | "smbfs" => (
            Reach::Network,
            "SMB: byte-range locks go to the server as SMB locks (which also \
             block other clients' reads and writes of the range), unless the \
             mount has nobrl",
        ),
        "ceph" => (
            Reach::Network,
            "CephFS: fcntl and flock locks go through the metadata servers",
        ),
        "gfs2" | "ocfs2" => (
            Reach::Network,
            "a cluster file system: locks go through the cluster's lock \
             manager, unless mounted localflocks",
        ),
        "lustre" => (
            Reach::Network,
            "Lustre: locks reach other clients only when mounted with flock \
             (localflock keeps them on this node)",
        ),
        "fuse" | "fuseblk" => (
            Reach::LocalLocksOnly,
            "a user-space (FUSE) file system: the kernel keeps its locks on \
             this machine, on the FUSE file, unless the file system \
             implements locking itself; processes on other machines, or \
             using the same file under its own name outside this mount, are \
             not kept out",
        ),
        "9p" => (
            Reach::LocalLocksOnly,
            "9p: locks reach the server only with 9P2000.L and a server that \
             implements them; otherwise they stay on this machine",
        ),
        "afs" | "openafs" | "coda" => (
            Reach::LocalLocksOnly,
            "AFS/Coda: byte-range locks are kept on this machine only",
        ),
        "gpfs" => (
            Reach::Network,
            "GPFS: locks go through the cluster (unless disabled)",
        ),
        _ => (
            Reach::Local,
            "a local file system: the kernel's locks are exact",
        ),
    }
}

/// The mount options of a network file system that keep some locks on
/// this client: (option, which locks, why).
pub fn local_lock_options(m: &Mount) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let base = m.fs_type.split('.').next().unwrap_or("");
    let both = "fcntl and flock(2) locks (every mode)";
    match base {
        "nfs" | "nfs4" => {
            if m.option("nolock").is_some() {
                out.push(("nolock".to_string(), both));
            }
            match m.option("local_lock") {
                Some("all") => out.push(("local_lock=all".to_string(), both)),
                Some("posix") => out.push((
                    "local_lock=posix".to_string(),
                    "fcntl locks (modes ofd, process, and shm's in-use marker)",
                )),
                Some("flock") => out.push((
                    "local_lock=flock".to_string(),
                    "flock(2) locks (mode flock, flock(1), `locksfile run` without an index)",
                )),
                _ => {}
            }
        }
        "cifs" | "smb3" | "smbfs" if m.option("nobrl").is_some() => {
            out.push(("nobrl".to_string(), both));
        }
        "gfs2" | "ocfs2" if m.option("localflocks").is_some() => {
            out.push(("localflocks".to_string(), both));
        }
        "lustre" => {
            if m.option("localflock").is_some() {
                out.push(("localflock".to_string(), both));
            }
            if m.option("noflock").is_some() {
                out.push(("noflock".to_string(), "every lock (refused)"));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
40 22 0:52 / /mnt/shared rw,relatime shared:30 - nfs4 srv:/export rw,vers=4.2,rsize=1048576,hard,proto=tcp,local_lock=none,addr=10.0.0.5
41 22 0:53 / /mnt/old rw,relatime - nfs srv:/old rw,vers=3,nolock,proto=tcp,mountaddr=10.0.0.5,local_lock=all
42 22 0:54 / /mnt/flocal rw - nfs4 srv:/x rw,vers=4.1,local_lock=flock
43 22 0:55 / /mnt/with\\040space rw - cifs //srv/share rw,vers=3.0,nobrl
44 22 0:56 / /home/me/remote rw,nosuid,nodev - fuse.sshfs me@host:/ rw,user_id=0,group_id=0
";

    #[test]
    fn finds_the_mount_and_its_options() {
        let root = mount_of(FIXTURE, 254, 1, "/var/lock/app.lock").unwrap();
        assert_eq!(
            (root.fs_type.as_str(), root.mount_point.as_str()),
            ("ext4", "/")
        );
        assert!(local_lock_options(&root).is_empty());
        assert_eq!(reach("ext4").0, Reach::Local);

        let shared = mount_of(FIXTURE, 0, 52, "/mnt/shared/app.lock").unwrap();
        assert_eq!(shared.option("local_lock"), Some("none"));
        assert!(
            local_lock_options(&shared).is_empty(),
            "local_lock=none is fine"
        );
        assert_eq!(reach(&shared.fs_type).0, Reach::Network);

        let old = mount_of(FIXTURE, 0, 53, "/mnt/old/app.lock").unwrap();
        let found: Vec<String> = local_lock_options(&old).into_iter().map(|o| o.0).collect();
        assert_eq!(found, ["nolock", "local_lock=all"]);

        let flocal = mount_of(FIXTURE, 0, 54, "/mnt/flocal/a").unwrap();
        let found = local_lock_options(&flocal);
        assert_eq!(found.len(), 1);
        assert!(found[0].1.contains("flock(2)"));

        let cifs = mount_of(FIXTURE, 0, 55, "/mnt/with space/a").unwrap();
        assert_eq!(cifs.mount_point, "/mnt/with space");
        assert_eq!(local_lock_options(&cifs)[0].0, "nobrl");

        let fuse = mount_of(FIXTURE, 0, 56, "/home/me/remote/a").unwrap();
        assert_eq!(fuse.fs_type, "fuse.sshfs");
        assert_eq!(reach(&fuse.fs_type).0, Reach::LocalLocksOnly);

        assert!(mount_of(FIXTURE, 9, 9, "/x").is_none());
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn picks_the_longest_mount_point_of_the_device() {
        // A bind mount of a subfolder of the same device.
        let text = "\
22 1 254:1 / / rw - ext4 /dev/vda1 rw
50 22 254:1 /srv/data /data rw - ext4 /dev/vda1 rw
";
        assert_eq!(
            mount_of(text, 254, 1, "/data/x.lock").unwrap().mount_point,
            "/data"
        );
        assert_eq!(
            mount_of(text, 254, 1, "/srv/data/x.lock")
                .unwrap()
                .mount_point,
            "/"
        );
    }
}
