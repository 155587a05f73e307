//! The file side of publishing: checksums, the safe move from the stage root into the
//! products root, and the search for a complete copy after a crash.
//!
//! Nothing here trusts a path because an event names it, and nothing is done by path
//! name where a swap could redirect it. Each root is opened once; every path below it is
//! resolved by the kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a
//! symlink anywhere below a root (a staged folder, a type folder, a component swapped in
//! while a copy runs) is refused, never followed. Files are opened `O_NOFOLLOW |
//! O_NONBLOCK` and checked with `fstat` (a FIFO, socket or device is refused without
//! blocking); folders are walked through their open handles; the source is removed entry
//! by entry, and only the entries that were copied (same device and inode), so nothing
//! added meanwhile and nothing outside the root is ever deleted. Temporary copies live
//! in `PRODUCTS/.contimg-tmp/` under UUID names, a folder no product can be published
//! into, so cleaning it after a crash can never remove a product.
//!
//! Checksums: a file's is the BLAKE3 of its bytes (what `b3sum` prints); a folder's is
//! `tree2:` and the BLAKE3 of a manifest of every entry in name order (a tag for file or
//! folder, the relative name with its length, a file's size and bytes), so two trees of
//! different shapes never share one. (A folder registered before `tree2:` carries a bare
//! checksum that no folder matches now; it must be registered again. Accepting the old
//! form would let a folder pose as a file whose bytes spell its manifest.)

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::dirsync::DirSyncs;

/// The folder of temporary copies, directly under the products root.
pub const TMP_DIR: &str = ".contimg-tmp";

/// Bytes read between two looks at the [`Budget`].
pub const CHUNK: usize = 1 << 20;

/// The prefix of a folder's checksum in the manifest form.
const TREE: &str = "tree2:";

/// Deepest nesting of folders read below a staged product: deeper is refused (a walk
/// holds one open folder per level, and a tree is never followed without a bound).
pub const MAX_DEPTH: usize = 64;

/// A failed move, and whether trying again later may help.
#[derive(Debug)]
pub struct MoveError {
    pub message: String,
    pub retryable: bool,
    /// Cut short by a shutdown, not by the product: recorded as an interruption.
    pub interrupted: bool,
}

impl MoveError {
    pub fn retryable(message: String) -> Self {
        MoveError {
            message,
            retryable: true,
            interrupted: false,
        }
    }

    pub fn fatal(message: String) -> Self {
        MoveError {
            message,
            retryable: false,
            interrupted: false,
        }
    }

    fn io(what: &str, e: std::io::Error) -> Self {
        if let Some(stop) = e.get_ref().and_then(|i| i.downcast_ref::<Stopped>()) {
            return MoveError {
                message: format!("{what}: {stop}"),
                retryable: true,
                interrupted: matches!(stop, Stopped::Shutdown),
            };
        }
        // A staged file that is missing may come back (an operator restores it). Not
        // retryable: a file the publisher may not read, a symlink, something that is not
        // a regular file or folder (trying again would not change what it is).
        let retryable = !matches!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidInput
        );
        MoveError {
            message: format!("{what}: {e}"),
            retryable,
            interrupted: false,
        }
    }
}

/// Why a copy or a checksum stopped between two chunks.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Stopped {
    #[error("cut short: the server is shutting down")]
    Shutdown,
    #[error("cut short: the publish took longer than its time limit")]
    TimeLimit,
}

/// When long work on files must stop: checked between chunks of at most [`CHUNK`] bytes,
/// so a publish (its hashing included) ends soon after a shutdown or its time limit.
pub struct Budget<'a> {
    pub deadline: Instant,
    pub cancel: &'a AtomicBool,
}

impl Budget<'_> {
    fn check(&self) -> std::io::Result<()> {
        let stop = if self.cancel.load(Ordering::Relaxed) {
            Stopped::Shutdown
        } else if Instant::now() >= self.deadline {
            Stopped::TimeLimit
        } else {
            return Ok(());
        };
        Err(std::io::Error::other(stop))
    }
}

/// Whether an error is a [`Budget`] stop (shutdown or time limit).
fn is_stop(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Stopped>())
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

fn cstr(name: &OsStr) -> std::io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| invalid(format!("{name:?} holds a NUL")))
}

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `struct open_how` of `openat2(2)` (libc's is not constructible outside it).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// A folder held open; every name below it is resolved beneath it, no symlink followed.
pub struct Dir {
    fd: OwnedFd,
    /// For messages only; never used to reach the folder.
    path: PathBuf,
}

impl Dir {
    /// Opens a configured root (the root itself may be reached through a symlink).
    pub fn open_root(path: &Path) -> std::io::Result<Dir> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)?;
        Ok(Dir {
            fd: OwnedFd::from(f),
            path: path.to_path_buf(),
        })
    }

    fn openat2(&self, rel: &Path, flags: libc::c_int, mode: u32) -> std::io::Result<OwnedFd> {
        let c = cstr(rel.as_os_str())?;
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: mode as u64,
            resolve: libc::RESOLVE_BENEATH
                | libc::RESOLVE_NO_SYMLINKS
                | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: a valid dirfd, a NUL-terminated path and an open_how of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => invalid(format!(
                    "{} passes through a symbolic link or leaves its root",
                    self.path.join(rel).display()
                )),
                Some(libc::ENOTDIR) if flags & libc::O_DIRECTORY != 0 => invalid(format!(
                    "{} is not a folder (a symbolic link is never followed)",
                    self.path.join(rel).display()
                )),
                _ => e,
            });
        }
        // SAFETY: the kernel returned a new descriptor that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }

    /// A folder below this one (`rel` may have several components).
    pub fn sub(&self, rel: &Path) -> std::io::Result<Dir> {
        if rel.as_os_str().is_empty() {
            return Ok(Dir {
                fd: self.fd.try_clone()?,
                path: self.path.clone(),
            });
        }
        let fd = self.openat2(
            rel,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        Ok(Dir {
            fd,
            path: self.path.join(rel),
        })
    }

    /// A folder directly below this one, created when missing.
    pub fn make_sub(&self, name: &str) -> std::io::Result<Dir> {
        let c = cstr(OsStr::new(name))?;
        // SAFETY: a valid dirfd and a NUL-terminated name.
        let rc = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o755) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            // Something else holds the name. A symlink there is refused for good; a file
            // may be moved away by an operator, so that failure is worth retrying.
            if let Some(st) = self.stat(OsStr::new(name))? {
                match st_kind(&st) {
                    libc::S_IFDIR => {}
                    libc::S_IFLNK => {
                        return Err(invalid(format!(
                            "{} is a symbolic link, never followed",
                            self.path.join(name).display()
                        )));
                    }
                    other => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::NotADirectory,
                            format!(
                                "{} is {}, not a folder",
                                self.path.join(name).display(),
                                if other == libc::S_IFREG {
                                    "a file"
                                } else {
                                    mode_name(other)
                                }
                            ),
                        ));
                    }
                }
            }
        }
        self.sub(Path::new(name))
    }

    /// What `name` is, without following it; `None` when it does not exist.
    fn stat(&self, name: &OsStr) -> std::io::Result<Option<libc::stat>> {
        let c = cstr(name)?;
        // SAFETY: zeroed plain-old-data, filled by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid dirfd, a NUL-terminated name and a stat buffer.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::NotFound {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(st))
    }

    /// A regular file directly below, for reading; anything else is refused unopened.
    fn open_file(&self, name: &OsStr) -> std::io::Result<(std::fs::File, Id)> {
        let fd = self.openat2(
            Path::new(name),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        )?;
        let f = std::fs::File::from(fd);
        let m = f.metadata()?;
        if !m.is_file() {
            return Err(not_regular(&self.path.join(name), kind_name(m.file_type())));
        }
        use std::os::unix::fs::MetadataExt;
        Ok((f, Id(m.dev(), m.ino())))
    }

    fn create_file(&self, name: &OsStr) -> std::io::Result<std::fs::File> {
        let fd = self.openat2(
            Path::new(name),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o644,
        )?;
        Ok(std::fs::File::from(fd))
    }

    /// The names directly below, sorted (read through the open handle).
    fn names(&self) -> std::io::Result<Vec<OsString>> {
        let mut names: Vec<OsString> =
            std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    }

    fn unlink(&self, name: &OsStr, dir: bool) -> std::io::Result<()> {
        let c = cstr(name)?;
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a valid dirfd and a NUL-terminated name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), flags) }).map(|_| ())
    }

    /// Renames `name` here to `to_name` in `to`, never replacing: `AlreadyExists` then.
    fn rename_noreplace(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> std::io::Result<()> {
        let (f, t) = (cstr(name)?, cstr(to_name)?);
        // SAFETY: valid dirfds and NUL-terminated names.
        check(unsafe {
            libc::renameat2(
                self.fd.as_raw_fd(),
                f.as_ptr(),
                to.fd.as_raw_fd(),
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        })
        .map(|_| ())
    }

    pub fn sync(&self) -> std::io::Result<()> {
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fsync(self.fd.as_raw_fd()) }).map(|_| ())
    }

    /// [`Dir::sync`], shared with the other publishes syncing this folder.
    fn sync_shared(&self, syncs: &DirSyncs) -> std::io::Result<()> {
        let Id(dev, ino) = file_id(&self.fd)?;
        syncs.sync((dev, ino, self.path.clone()), || self.sync())
    }
}

/// Device and inode: which file an entry is, whatever its name says later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Id(u64, u64);

fn st_id(st: &libc::stat) -> Id {
    Id(st.st_dev, st.st_ino)
}

/// Which file an open descriptor is.
fn file_id(fd: &impl AsRawFd) -> std::io::Result<Id> {
    // SAFETY: zeroed plain-old-data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a stat buffer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st_id(&st))
}

fn st_kind(st: &libc::stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

fn not_regular(path: &Path, what: &str) -> std::io::Error {
    invalid(format!(
        "{} is {what}, not a regular file or folder",
        path.display()
    ))
}

fn kind_name(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_dir() {
        "a folder"
    } else {
        "something else"
    }
}

fn mode_name(mode: u32) -> &'static str {
    match mode {
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFBLK | libc::S_IFCHR => "a device",
        _ => "something else",
    }
}

/// What was read of a staged product: its checksum (and the old folder form when asked),
/// its size, and the identity of every entry, for removing exactly those.
pub struct Walked {
    pub checksum: String,
    pub size: u64,
    tree: Node,
    /// The copy made, when one was asked for: which file (or folder) it is.
    copy: Option<Id>,
}

enum Node {
    File(Id),
    Dir(Id, Vec<(OsString, Node)>),
}

impl Walked {
    /// Whether this is what `recorded` names. A file's checksum never equals a folder's
    /// (`tree2:` prefix), so a file swapped for a folder, or back, never matches.
    pub fn matches(&self, recorded: &str) -> bool {
        self.checksum == recorded
    }
}

/// Reads the product `name` in `parent` (a file or a folder of regular files and
/// folders), hashing it and, when `to` is given, copying it there under `to_name` with
/// every file and folder fsynced.
fn walk(
    parent: &Dir,
    name: &OsStr,
    to: Option<(&Dir, &OsStr)>,
    budget: &Budget,
) -> std::io::Result<Walked> {
    let st = parent.stat(name)?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", parent.path.join(name).display()),
        )
    })?;
    let mut buf = vec![0u8; READ];
    match st_kind(&st) {
        libc::S_IFREG => {
            let (mut from, id) = parent.open_file(name)?;
            if let Some((d, n)) = to {
                return copy_file(from, id, &mut d.create_file(n)?, &mut buf, budget);
            }
            let mut hasher = blake3::Hasher::new();
            Ok(Walked {
                size: hash_chunks(&mut from, &mut hasher, &mut buf, budget)?,
                checksum: hasher.finalize().to_hex().to_string(),
                tree: Node::File(id),
                copy: None,
            })
        }
        libc::S_IFDIR => {
            let dir = parent.sub(Path::new(name))?;
            let out = match to {
                Some((d, n)) => Some(d.make_new_sub(n)?),
                None => None,
            };
            let mut w = Hashers {
                tree: blake3::Hasher::new(),
                size: 0,
                buf,
            };
            let children = walk_dir(&dir, out.as_ref(), Path::new(""), &mut w, budget, 1)?;
            let copy = match &out {
                Some(o) => {
                    o.sync()?;
                    Some(file_id(&o.fd)?)
                }
                None => None,
            };
            Ok(Walked {
                checksum: format!("{TREE}{}", w.tree.finalize().to_hex()),
                size: w.size,
                tree: Node::Dir(st_id(&st), children),
                copy,
            })
        }
        other => Err(not_regular(&parent.path.join(name), mode_name(other))),
    }
}

impl Dir {
    /// A new folder directly below (it must not exist yet).
    fn make_new_sub(&self, name: &OsStr) -> std::io::Result<Dir> {
        let c = cstr(name)?;
        // SAFETY: a valid dirfd and a NUL-terminated name.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o755) })?;
        self.sub(Path::new(name))
    }
}

struct Hashers {
    tree: blake3::Hasher,
    size: u64,
    buf: Vec<u8>,
}

fn walk_dir(
    dir: &Dir,
    out: Option<&Dir>,
    rel: &Path,
    h: &mut Hashers,
    budget: &Budget,
    depth: usize,
) -> std::io::Result<Vec<(OsString, Node)>> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!(
            "{} is nested deeper than {MAX_DEPTH} folders",
            dir.path.display()
        )));
    }
    let mut nodes = Vec::new();
    for name in dir.names()? {
        budget.check()?;
        let st = dir.stat(&name)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} vanished while it was read",
                    dir.path.join(&name).display()
                ),
            )
        })?;
        let path = rel.join(&name);
        let bytes = path.as_os_str().as_bytes();
        match st_kind(&st) {
            libc::S_IFDIR => {
                h.tree.update(b"d");
                h.tree.update(&(bytes.len() as u64).to_le_bytes());
                h.tree.update(bytes);
                let sub = dir.sub(Path::new(&name))?;
                let sub_out = match out {
                    Some(o) => Some(o.make_new_sub(&name)?),
                    None => None,
                };
                let children = walk_dir(&sub, sub_out.as_ref(), &path, h, budget, depth + 1)?;
                if let Some(o) = &sub_out {
                    o.sync()?;
                }
                nodes.push((name, Node::Dir(st_id(&st), children)));
            }
            libc::S_IFREG => {
                let (mut from, id) = dir.open_file(&name)?;
                let size = from.metadata()?.len();
                h.tree.update(b"f");
                h.tree.update(&(bytes.len() as u64).to_le_bytes());
                h.tree.update(bytes);
                h.tree.update(&size.to_le_bytes());
                let mut to = out.map(|o| o.create_file(&name)).transpose()?;
                let n = match to.as_mut() {
                    Some(t) => copy_chunks(&mut from, t, &mut h.tree, &mut h.buf, budget)?,
                    None => hash_chunks(&mut from, &mut h.tree, &mut h.buf, budget)?,
                };
                if n != size {
                    return Err(std::io::Error::other(format!(
                        "{} changed size while it was read",
                        dir.path.join(&name).display()
                    )));
                }
                if let Some(t) = to {
                    t.sync_all()?;
                }
                h.size += n;
                nodes.push((name, Node::File(id)));
            }
            other => return Err(not_regular(&dir.path.join(&name), mode_name(other))),
        }
    }
    Ok(nodes)
}

/// Copies the regular file `from` (entry `id`) into `out`, fsynced and hashed back.
fn copy_file(
    mut from: std::fs::File,
    id: Id,
    out: &mut std::fs::File,
    buf: &mut [u8],
    budget: &Budget,
) -> std::io::Result<Walked> {
    let mut hasher = blake3::Hasher::new();
    let size = copy_chunks(&mut from, out, &mut hasher, buf, budget)?;
    out.sync_all()?;
    Ok(Walked {
        checksum: hasher.finalize().to_hex().to_string(),
        size,
        tree: Node::File(id),
        copy: Some(file_id(out)?),
    })
}

/// Bytes read into memory at a time when hashing (small enough to stay in the CPU's
/// cache between the read and the hash).
const READ: usize = 256 << 10;

/// Hashes what `from` holds from where it stands to its end; the bytes read.
fn hash_chunks(
    from: &mut std::fs::File,
    hasher: &mut blake3::Hasher,
    buf: &mut [u8],
    budget: &Budget,
) -> std::io::Result<u64> {
    let mut n = 0u64;
    // Checked before the first read too, then after every `CHUNK` bytes.
    let mut since_check = CHUNK;
    loop {
        if since_check >= CHUNK {
            budget.check()?;
            since_check = 0;
        }
        let got = match from.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..got]);
        n += got as u64;
        since_check += got;
    }
}

/// Copies `from` into `to` (by the kernel where it can), then hashes the copy as it now
/// reads back from the file system: the checksum compared with the recorded one is the
/// copy's own, not what was meant to be written. The bytes copied.
fn copy_chunks(
    from: &mut std::fs::File,
    to: &mut std::fs::File,
    hasher: &mut blake3::Hasher,
    buf: &mut [u8],
    budget: &Budget,
) -> std::io::Result<u64> {
    let mut n = 0u64;
    let mut kernel = true;
    loop {
        budget.check()?;
        if kernel {
            // SAFETY: two open descriptors; null offsets use (and advance) the files' own.
            let rc = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    to.as_raw_fd(),
                    std::ptr::null_mut(),
                    CHUNK,
                    0,
                )
            };
            if rc > 0 {
                n += rc as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match (rc, e.raw_os_error()) {
                (_, Some(libc::EINTR)) if rc < 0 => continue,
                // The end, or a file system that copies nothing this way (some report 0
                // for files they cannot copy): read and write from here, which either
                // confirms the end or copies the rest.
                (0, _) => kernel = false,
                (
                    _,
                    Some(
                        libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::EPERM,
                    ),
                ) => kernel = false,
                _ => return Err(e),
            }
            continue;
        }
        let got = match from.read(&mut buf[..]) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..got])?;
        n += got as u64;
    }
    to.seek(std::io::SeekFrom::Start(0))?;
    let hashed = hash_chunks(to, hasher, buf, budget)?;
    if hashed != n {
        return Err(std::io::Error::other(format!(
            "the copy holds {hashed} bytes where {n} were written"
        )));
    }
    Ok(n)
}

/// Removes exactly the entries `walked` read, those still the same files (device and
/// inode) under the same names; a folder that holds anything else is left in place.
fn remove_walked(parent: &Dir, name: &OsStr, node: &Node) -> std::io::Result<()> {
    let Some(st) = parent.stat(name)? else {
        return Ok(());
    };
    match node {
        Node::File(id) if st_kind(&st) == libc::S_IFREG && st_id(&st) == *id => {
            parent.unlink(name, false)
        }
        Node::Dir(id, children) if st_kind(&st) == libc::S_IFDIR && st_id(&st) == *id => {
            let dir = parent.sub(Path::new(name))?;
            for (n, child) in children {
                remove_walked(&dir, n, child)?;
            }
            match parent.unlink(name, true) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    tracing::warn!(path = %parent.path.join(name).display(), "a staged folder gained entries while it was published; they are left in place");
                    Ok(())
                }
                other => other,
            }
        }
        _ => {
            tracing::warn!(path = %parent.path.join(name).display(), "a staged entry changed while it was published; left in place");
            Ok(())
        }
    }
}

/// Removes `name` and everything below it (used only on copies of our own making, which
/// are never deeper than [`MAX_DEPTH`]; anything deeper is left in place).
fn remove_all(parent: &Dir, name: &OsStr) -> std::io::Result<()> {
    remove_below(parent, name, 0)
}

fn remove_below(parent: &Dir, name: &OsStr, depth: usize) -> std::io::Result<()> {
    let Some(st) = parent.stat(name)? else {
        return Ok(());
    };
    if st_kind(&st) == libc::S_IFDIR {
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "{} is nested deeper than {MAX_DEPTH} folders; left in place",
                parent.path.join(name).display()
            )));
        }
        let dir = parent.sub(Path::new(name))?;
        for n in dir.names()? {
            remove_below(&dir, &n, depth + 1)?;
        }
        parent.unlink(name, true)
    } else {
        parent.unlink(name, false)
    }
}

/// Where a recorded staged path lies: its folder (opened beneath the stage root) and its
/// name. A path that is not below the stage root, or passes through a symlink, is refused.
pub struct Located {
    pub parent: Dir,
    pub name: OsString,
    /// The staged path below the stage root as it really is (no symlink on the way).
    pub path: PathBuf,
}

pub fn locate(stage_root: &Path, stage_path: &str) -> std::io::Result<Located> {
    super::paths::check_components(stage_path).map_err(|e| invalid(e.to_string()))?;
    let root = Dir::open_root(stage_root)?;
    let real_root = stage_root.canonicalize()?;
    let p = Path::new(stage_path);
    let rel = if p.is_absolute() {
        p.strip_prefix(&real_root)
            .or_else(|_| p.strip_prefix(stage_root))
            .map_err(|_| {
                invalid(format!(
                    "{stage_path:?} is outside the stage root {}",
                    real_root.display()
                ))
            })?
    } else {
        p
    };
    // One spelling per place: `x/`, `./x`, `x/.` and `x//` are all `x`, so that the path
    // recorded (and compared with other products') is the same however it was written.
    let rel: PathBuf = rel
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let name = rel
        .file_name()
        .ok_or_else(|| invalid(format!("{stage_path:?} names no file")))?
        .to_os_string();
    let parent = root.sub(rel.parent().unwrap_or(Path::new("")))?;
    Ok(Located {
        parent,
        name,
        path: real_root.join(&rel),
    })
}

/// Where a staged product really is, its checksum and its size, read beneath the stage
/// root.
pub fn checksum_staged(
    stage_root: &Path,
    stage_path: &str,
    budget: &Budget,
) -> std::io::Result<(PathBuf, String, u64)> {
    let at = locate(stage_root, stage_path)?;
    let w = walk(&at.parent, &at.name, None, budget)?;
    Ok((at.path, w.checksum, w.size))
}

/// The checksum of any path (a file or a folder), opened as a root of its own: for tests
/// and tools. Symlinks below it are refused.
pub fn checksum_path(path: &Path) -> std::io::Result<(String, u64)> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| invalid(format!("{} names no file", path.display())))?;
    let cancel = AtomicBool::new(false);
    let budget = Budget {
        deadline: Instant::now() + std::time::Duration::from_secs(365 * 86_400),
        cancel: &cancel,
    };
    let w = walk(&Dir::open_root(parent)?, name, None, &budget)?;
    Ok((w.checksum, w.size))
}

fn suffixed(name: &str, n: u32) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}_{n}.{ext}"),
        _ => format!("{name}_{n}"),
    }
}

/// The names a product may be published under: `name`, then `name_1` ... `name_99`
/// (before the extension).
fn candidates(name: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(name.to_string()).chain((1..100).map(move |n| suffixed(name, n)))
}

/// The type folder under the products root: a real folder (a symlink there is refused),
/// never the temporaries' folder.
fn type_folder(products: &Dir, type_dir: &str) -> std::io::Result<Dir> {
    if type_dir == TMP_DIR || type_dir.contains('/') || type_dir.starts_with('.') {
        return Err(invalid(format!("{type_dir:?} is not a products folder")));
    }
    products.make_sub(type_dir)
}

/// What a move needs: the recorded facts, the roots they must lie in, and its budget.
pub struct MoveRequest<'a> {
    pub stage_root: &'a Path,
    pub products_root: &'a Path,
    /// The staged path as registered; resolved again here, never trusted.
    pub stage_path: &'a str,
    pub type_dir: &'a str,
    /// The checksum recorded at registration; a move without one is refused.
    pub checksum: Option<&'a str>,
    pub budget: Budget<'a>,
    /// Folder fsyncs shared with the publishes running beside it.
    pub syncs: &'a DirSyncs,
}

/// The move: locate the source beneath the stage root; copy it into
/// `PRODUCTS/.contimg-tmp/<uuid>`, read the copy back, and fsync it; refuse it if it does
/// not have the recorded checksum; rename it into place (never over an existing file),
/// fsync both folders (sharing the fsyncs of publishes in flight beside it), check that
/// the published name is that verified copy, and only then remove the entries that were
/// copied. An existing destination with the same checksum is success; another one gets a
/// suffix.
pub fn move_product(req: &MoveRequest) -> Result<PathBuf, MoveError> {
    let expected = req.checksum.ok_or_else(|| {
        MoveError::fatal(format!(
            "{} was registered without a checksum; register it again",
            req.stage_path
        ))
    })?;
    let src = locate(req.stage_root, req.stage_path)
        .map_err(|e| MoveError::io(&format!("staged product {}", req.stage_path), e))?;
    let products = Dir::open_root(req.products_root)
        .map_err(|e| MoveError::io("opening the products root", e))?;
    let dest = type_folder(&products, req.type_dir)
        .map_err(|e| MoveError::io("opening the products folder", e))?;
    let copying = |e| {
        MoveError::io(
            &format!(
                "copying {} into the products root",
                src.parent.path.join(&src.name).display()
            ),
            e,
        )
    };
    let tmp = products
        .make_sub(TMP_DIR)
        .map_err(|e| MoveError::io("opening the temporary folder", e))?;
    let tmp_name = OsString::from(uuid::Uuid::new_v4().to_string());
    let placed = walk(&src.parent, &src.name, Some((&tmp, &tmp_name)), &req.budget)
        .map_err(copying)
        .and_then(|copied| {
            place(&dest, &src, copied, expected, &req.budget, |candidate| {
                tmp.rename_noreplace(&tmp_name, &dest, candidate)
            })
        });
    if !matches!(placed, Ok((_, _, true))) {
        let _ = remove_all(&tmp, &tmp_name);
    }
    let (final_name, copied, ours) = placed?;
    dest.sync_shared(req.syncs)
        .map_err(|e| MoveError::io("syncing the products folder", e))?;
    let _ = tmp.sync_shared(req.syncs);
    // The copy was verified (read back and hashed) before it was put in place, and that
    // very file was renamed: the published name must still be it. One that was
    // there before was hashed when it was found.
    if ours {
        let published = dest
            .stat(OsStr::new(&final_name))
            .map_err(|e| MoveError::io("verifying the published copy", e))?;
        if published.map(|st| st_id(&st)) != copied.copy {
            return Err(MoveError::retryable(format!(
                "the published copy of {} was replaced before it could be verified",
                req.stage_path
            )));
        }
    }
    // The copy is verified: the product is published. A staged copy that will not go away
    // is worth a warning, not a failed publish (which would retry against a half-removed
    // source).
    if let Err(e) = remove_walked(&src.parent, &src.name, &copied.tree) {
        tracing::warn!(path = %req.stage_path, error = %e, "published, but the staged copy could not be removed");
    }
    let _ = src.parent.sync_shared(req.syncs);
    Ok(dest.path.join(final_name))
}

/// Puts a copy in place once it is found to have the recorded checksum: `put` under the
/// product's name, or the first of its suffixed names that is free, unless one already
/// there has the same checksum. The name, the copy, and whether the copy is the one in
/// place.
fn place(
    dest: &Dir,
    src: &Located,
    copied: Walked,
    expected: &str,
    budget: &Budget,
    put: impl Fn(&OsStr) -> std::io::Result<()>,
) -> Result<(String, Walked, bool), MoveError> {
    if !copied.matches(expected) {
        return Err(MoveError::fatal(format!(
            "staged product {} changed since it was registered (checksum {}, expected {expected})",
            src.parent.path.join(&src.name).display(),
            copied.checksum
        )));
    }
    let name = src.name.to_string_lossy().to_string();
    for candidate in candidates(&name) {
        match put(OsStr::new(&candidate)) {
            Ok(()) => return Ok((candidate, copied, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A shutdown or the time limit while looking is not "different": it
                // stops the move, rather than placing a second copy under the next name.
                match walk(dest, OsStr::new(&candidate), None, budget) {
                    Ok(w) if w.matches(expected) => return Ok((candidate, copied, false)),
                    Err(e) if is_stop(&e) => {
                        return Err(MoveError::io("comparing with an existing product", e));
                    }
                    _ => {}
                }
            }
            Err(e) => return Err(MoveError::io("putting the copy in place", e)),
        }
    }
    Err(MoveError::fatal(format!(
        "100 products named like {name} already exist"
    )))
}

/// What recovery found of a publish a crash cut short.
pub struct Found {
    /// A complete copy with the recorded checksum where the rule puts the product.
    pub complete: Option<PathBuf>,
    /// The staged source, beneath the stage root, still has the recorded checksum.
    pub source_intact: bool,
}

/// Looks for the outcome of an interrupted publish. The staged source is removed only
/// when a complete copy with the recorded checksum is where the rule puts the product
/// *and* the source itself (beneath the stage root, no symlink) still has that checksum;
/// then exactly the entries that were read are removed. Without a recorded checksum
/// nothing is complete and nothing is removed.
pub fn settle_interrupted(
    stage_root: &Path,
    products_root: &Path,
    stage_path: &str,
    type_dir: &str,
    checksum: Option<&str>,
    budget: &Budget,
) -> Found {
    let none = Found {
        complete: None,
        source_intact: false,
    };
    let Some(checksum) = checksum else {
        return none;
    };
    let source = locate(stage_root, stage_path).ok().and_then(|at| {
        let w = walk(&at.parent, &at.name, None, budget).ok()?;
        w.matches(checksum).then_some((at, w))
    });
    let name = Path::new(stage_path)
        .file_name()
        .map(|n| n.to_string_lossy().to_string());
    // The destination follows from the rule, not from the event: an event naming a path
    // is a record of intent, never a permission.
    let complete = name.and_then(|name| {
        let products = Dir::open_root(products_root).ok()?;
        let dest = products.sub(Path::new(type_dir)).ok()?;
        candidates(&name)
            .find(|c| walk(&dest, OsStr::new(c), None, budget).is_ok_and(|w| w.matches(checksum)))
            .map(|c| dest.path.join(c))
    });
    let source_intact = source.is_some();
    if complete.is_some()
        && let Some((at, w)) = &source
        && let Err(e) = remove_walked(&at.parent, &at.name, &w.tree)
    {
        tracing::warn!(path = %stage_path, error = %e, "recovered a publish, but the staged copy could not be removed");
    }
    Found {
        complete,
        source_intact,
    }
}

/// Removes temporary copies left by an interrupted move (only the owner publishes, and
/// this runs before it starts, so none is in use). Only UUID-named entries of
/// `PRODUCTS/.contimg-tmp/` are touched, and only when that is a real folder.
pub fn remove_temporaries(products_root: &Path) {
    let tmp = match Dir::open_root(products_root).and_then(|p| p.sub(Path::new(TMP_DIR))) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(root = %products_root.display(), error = %e, "the temporary folder cannot be opened as a folder; leaving it alone");
            return;
        }
    };
    let Ok(names) = tmp.names() else {
        return;
    };
    for name in names {
        if uuid::Uuid::parse_str(&name.to_string_lossy()).is_err() {
            tracing::warn!(path = %tmp.path.join(&name).display(), "not a temporary copy of ours; left in place");
            continue;
        }
        tracing::warn!(path = %tmp.path.join(&name).display(), "removing a temporary copy left by a crash");
        if let Err(e) = remove_all(&tmp, &name) {
            tracing::error!(path = %tmp.path.join(&name).display(), error = %e, "removing a temporary copy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `move_product` of `path` (below `stage`) into `products/type_dir`, with a day to do it.
    fn move_in(
        stage: &Path,
        products: &Path,
        path: &str,
        type_dir: &str,
        sum: &str,
        syncs: &DirSyncs,
    ) -> Result<PathBuf, MoveError> {
        let cancel = AtomicBool::new(false);
        move_product(&MoveRequest {
            stage_root: stage,
            products_root: products,
            stage_path: path,
            type_dir,
            checksum: Some(sum),
            budget: budget(&cancel),
            syncs,
        })
    }

    /// `DIR/stage` and `DIR/products`, with the products folder `images`.
    fn stage_and_products(dir: &Path) -> (PathBuf, PathBuf) {
        let (stage, products) = (dir.join("stage"), dir.join("products"));
        std::fs::create_dir_all(&stage).unwrap();
        std::fs::create_dir_all(products.join("images")).unwrap();
        (stage, products)
    }

    fn budget(cancel: &AtomicBool) -> Budget<'_> {
        Budget {
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            cancel,
        }
    }

    /// Where the kernel will not copy (here: from a pipe, `EINVAL`), the copy reads and
    /// writes, and the checksum is still the copy's own, read back.
    #[test]
    fn a_copy_the_kernel_refuses_is_read_and_written_and_hashed_back() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let mut fds = [0; 2];
        // SAFETY: an array of two descriptors for the kernel to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just opened, and each is owned once.
        let (mut from, mut writer) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        writer.write_all(&data).unwrap(); // fits in the pipe's buffer
        drop(writer);
        let mut to = Dir::open_root(d.path())
            .unwrap()
            .create_file(OsStr::new("copy"))
            .unwrap();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; READ];
        let cancel = AtomicBool::new(false);
        let n = copy_chunks(&mut from, &mut to, &mut hasher, &mut buf, &budget(&cancel)).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(d.path().join("copy")).unwrap(), data);
        assert_eq!(hasher.finalize(), blake3::hash(&data));
    }

    fn mkfifo(p: &Path) {
        let c = CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        mkfifo(&fifo);
        let e = checksum_path(&fifo).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("FIFO"), "{e}");
        let folder = dir.path().join("f");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("a"), b"x").unwrap();
        std::fs::rename(&fifo, folder.join("b")).unwrap();
        assert!(
            checksum_path(&folder)
                .unwrap_err()
                .to_string()
                .contains("FIFO")
        );
    }

    #[test]
    fn symlinks_below_a_root_are_refused_anywhere() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let stage = root.path();
        std::fs::create_dir_all(stage.join("real/sub")).unwrap();
        std::fs::write(stage.join("real/sub/a.fits"), b"a").unwrap();
        // A symlinked folder on the way, and one inside a staged folder.
        std::os::unix::fs::symlink(outside.path(), stage.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), stage.join("real/sub/s"))
            .unwrap();
        let cancel = AtomicBool::new(false);
        let e = checksum_staged(stage, "link/secret", &budget(&cancel))
            .err()
            .unwrap();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = checksum_staged(stage, "real", &budget(&cancel))
            .err()
            .unwrap();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A name that merely contains `..` is a name.
        std::fs::write(stage.join("real/a..b.fits"), b"ab").unwrap();
        assert!(checksum_staged(stage, "real/a..b.fits", &budget(&cancel)).is_ok());
        let abs = outside.path().join("secret");
        let e = checksum_staged(stage, abs.to_str().unwrap(), &budget(&cancel))
            .err()
            .unwrap();
        assert!(e.to_string().contains("outside"), "{e}");
    }

    #[test]
    fn folder_checksums_tell_shapes_apart() {
        let d = tempfile::tempdir().unwrap();
        let two = d.path().join("two");
        std::fs::create_dir(&two).unwrap();
        std::fs::write(two.join("a"), b"1").unwrap();
        std::fs::write(two.join("b"), b"2").unwrap();
        let one = d.path().join("one");
        std::fs::create_dir(&one).unwrap();
        std::fs::write(one.join("a"), b"1b\x002").unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, b"a\x001b\x002").unwrap();
        let empty = d.path().join("empty");
        std::fs::create_dir_all(empty.join("e")).unwrap();
        let bare = d.path().join("bare");
        std::fs::create_dir(&bare).unwrap();
        let sums: Vec<String> = [&two, &one, &file, &empty, &bare]
            .iter()
            .map(|p| checksum_path(p).unwrap().0)
            .collect();
        for (i, a) in sums.iter().enumerate() {
            for b in &sums[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert!(sums[0].starts_with(TREE));
        // A file's checksum is what b3sum prints.
        assert_eq!(sums[2], blake3::hash(b"a\x001b\x002").to_hex().to_string());
    }

    #[test]
    fn a_folder_copy_hashes_like_its_checksum_and_removal_takes_only_what_was_copied() {
        let d = tempfile::tempdir().unwrap();
        let stage = d.path().join("stage");
        let src = stage.join("m.ms");
        std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(src.join("empty")).unwrap();
        std::fs::write(src.join("table.dat"), vec![3u8; 3 * CHUNK + 5]).unwrap();
        std::fs::write(src.join("sub/deeper/x"), b"x").unwrap();
        let products = d.path().join("products");
        std::fs::create_dir_all(&products).unwrap();
        let (sum, size) = checksum_path(&src).unwrap();
        assert_eq!(size, 3 * CHUNK as u64 + 6);
        let out = move_in(&stage, &products, "m.ms", "ms", &sum, &DirSyncs::default()).unwrap();
        assert_eq!(out, products.join("ms/m.ms"));
        assert_eq!(checksum_path(&out).unwrap().0, sum);
        assert!(out.join("empty").is_dir());
        assert!(!src.exists());
        assert_eq!(
            std::fs::read_dir(products.join(TMP_DIR)).unwrap().count(),
            0
        );
    }

    /// A different file under its name makes it `name_1`; the same file under its name
    /// counts as done; no temporary is left either way.
    #[test]
    fn a_file_is_put_in_place_beside_files_of_its_name() {
        let d = tempfile::tempdir().unwrap();
        let (stage, products) = stage_and_products(d.path());
        let syncs = DirSyncs::default();
        let publish = |bytes: &[u8]| {
            std::fs::write(stage.join("t.fits"), bytes).unwrap();
            let sum = checksum_path(&stage.join("t.fits")).unwrap().0;
            let out = move_in(&stage, &products, "t.fits", "images", &sum, &syncs).unwrap();
            assert!(!stage.join("t.fits").exists(), "the source is removed");
            out
        };
        assert_eq!(publish(b"first"), products.join("images/t.fits"));
        assert_eq!(publish(b"second"), products.join("images/t_1.fits"));
        assert_eq!(publish(b"first"), products.join("images/t.fits"));
        assert_eq!(
            std::fs::read(products.join("images/t.fits")).unwrap(),
            b"first"
        );
        assert_eq!(
            std::fs::read(products.join("images/t_1.fits")).unwrap(),
            b"second"
        );
        assert_eq!(
            std::fs::read_dir(products.join("images")).unwrap().count(),
            2
        );
        assert_eq!(
            std::fs::read_dir(products.join(TMP_DIR)).unwrap().count(),
            0,
            "no temporary left"
        );
    }

    #[test]
    fn a_symlinked_type_folder_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let stage = d.path().join("stage");
        let products = d.path().join("products");
        std::fs::create_dir_all(&stage).unwrap();
        std::fs::create_dir_all(products.join(TMP_DIR)).unwrap();
        std::fs::write(stage.join("t.fits"), b"t").unwrap();
        std::os::unix::fs::symlink(products.join(TMP_DIR), products.join("images")).unwrap();
        let sum = checksum_path(&stage.join("t.fits")).unwrap().0;
        let e = move_in(
            &stage,
            &products,
            "t.fits",
            "images",
            &sum,
            &DirSyncs::default(),
        )
        .unwrap_err();
        assert!(
            !e.retryable && e.message.contains("symbolic link"),
            "{}",
            e.message
        );
        assert!(stage.join("t.fits").exists());
    }

    #[test]
    fn recovery_removes_nothing_it_did_not_verify() {
        let d = tempfile::tempdir().unwrap();
        let (stage, products) = stage_and_products(d.path());
        std::fs::write(stage.join("keep.fits"), b"another product").unwrap();
        let sum = blake3::hash(b"big").to_hex().to_string();
        std::fs::write(products.join("images/big.fits"), b"big").unwrap();
        let cancel = AtomicBool::new(false);
        // The staged path is now a symlink to another product: found complete, kept.
        std::os::unix::fs::symlink("keep.fits", stage.join("big.fits")).unwrap();
        let f = settle_interrupted(
            &stage,
            &products,
            "big.fits",
            "images",
            Some(&sum),
            &budget(&cancel),
        );
        assert!(f.complete.is_some() && !f.source_intact);
        assert_eq!(
            std::fs::read(stage.join("keep.fits")).unwrap(),
            b"another product"
        );
        // The staged file was rewritten: not the product, kept.
        std::fs::remove_file(stage.join("big.fits")).unwrap();
        std::fs::write(stage.join("big.fits"), b"a new version").unwrap();
        let f = settle_interrupted(
            &stage,
            &products,
            "big.fits",
            "images",
            Some(&sum),
            &budget(&cancel),
        );
        assert!(f.complete.is_some() && !f.source_intact);
        assert!(stage.join("big.fits").exists());
        // The staged file is the product: removed.
        std::fs::write(stage.join("big.fits"), b"big").unwrap();
        let f = settle_interrupted(
            &stage,
            &products,
            "big.fits",
            "images",
            Some(&sum),
            &budget(&cancel),
        );
        assert!(f.complete.is_some() && f.source_intact);
        assert!(!stage.join("big.fits").exists());
    }

    /// What was opened stays what is acted on: the staged folder is swapped for a symlink
    /// to an outside folder after it was located, and removal still happens in the real
    /// folder, never outside.
    #[test]
    fn a_swap_after_locating_cannot_redirect_removal() {
        let d = tempfile::tempdir().unwrap();
        let stage = d.path().join("stage");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(stage.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(stage.join("sub/a.fits"), b"staged").unwrap();
        std::fs::write(outside.join("a.fits"), b"outside").unwrap();
        let cancel = AtomicBool::new(false);
        let at = locate(&stage, "sub/a.fits").unwrap();
        let w = walk(&at.parent, &at.name, None, &budget(&cancel)).unwrap();
        std::fs::rename(stage.join("sub"), stage.join("sub.real")).unwrap();
        std::os::unix::fs::symlink(&outside, stage.join("sub")).unwrap();
        remove_walked(&at.parent, &at.name, &w.tree).unwrap();
        assert_eq!(std::fs::read(outside.join("a.fits")).unwrap(), b"outside");
        assert!(
            !stage.join("sub.real/a.fits").exists(),
            "the staged file went"
        );
    }

    /// Regression: a folder nested some hundreds of levels deep overflowed the stack of
    /// the thread walking it, and the server could not start again.
    #[test]
    fn a_folder_nested_too_deep_is_refused_not_walked() {
        let d = tempfile::tempdir().unwrap();
        let mut deep = d.path().join("deep");
        for _ in 0..MAX_DEPTH + 5 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("leaf"), b"x").unwrap();
        let e = checksum_path(&d.path().join("deep")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("deeper than"), "{e}");
    }

    /// Regression: a file whose bytes spell a folder manifest in the old checksum form
    /// matched that folder, so a file could be swapped for a folder and still publish.
    #[test]
    fn a_file_swapped_for_a_folder_never_matches() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.fits");
        std::fs::write(&p, b"q.fits\x00DATA").unwrap();
        let (file_sum, _) = checksum_path(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("q.fits"), b"DATA").unwrap();
        let cancel = AtomicBool::new(false);
        let root = Dir::open_root(d.path()).unwrap();
        let w = walk(&root, OsStr::new("p.fits"), None, &budget(&cancel)).unwrap();
        assert!(!w.matches(&file_sum));
    }

    #[test]
    fn a_cancelled_copy_stops_between_chunks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![1u8; 4 * CHUNK]).unwrap();
        let root = Dir::open_root(dir.path()).unwrap();
        let cancel = AtomicBool::new(true);
        let e = walk(&root, OsStr::new("big"), None, &budget(&cancel))
            .err()
            .unwrap();
        let m = MoveError::io("copying", e);
        assert!(m.interrupted && m.retryable, "{}", m.message);
        cancel.store(false, Ordering::Relaxed);
        let late = Budget {
            deadline: Instant::now(),
            cancel: &cancel,
        };
        let e = walk(&root, OsStr::new("big"), None, &late).err().unwrap();
        let m = MoveError::io("copying", e);
        assert!(!m.interrupted && m.retryable, "{}", m.message);
        assert!(m.message.contains("time limit"), "{}", m.message);
    }
}
