//! The file side of publishing: checksums, the safe move from the stage root into the
//! products root, and the search for a complete copy after a crash.
//!
//! Nothing here trusts a path because an event names it. Every source is resolved inside
//! the stage root and every destination inside the products root (after symlinks) where
//! it is used; only regular files and folders of regular files are read (a FIFO, socket,
//! device or symlink is refused without being opened for long: files are opened with
//! `O_NONBLOCK | O_NOFOLLOW` and checked with `fstat`). Temporary copies live in
//! `PRODUCTS/.contimg-tmp/`, a folder no product can be published into, so cleaning it
//! after a crash can never remove a product.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::paths::{self, PathError};

/// The folder of temporary copies, directly under the products root.
pub const TMP_DIR: &str = ".contimg-tmp";

/// Bytes copied between two looks at the [`Budget`].
pub const CHUNK: usize = 1 << 20;

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
        // Not retryable: a file the publisher may not read, or one that is not a regular
        // file or folder (trying again would not change what it is).
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

    fn path(e: PathError) -> Self {
        // A staged file that is missing may come back (an operator restores it); a path
        // outside its root never becomes acceptable.
        let retryable = matches!(e, PathError::Missing(_));
        MoveError {
            message: e.to_string(),
            retryable,
            interrupted: false,
        }
    }
}

/// Why a copy stopped between two chunks.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Stopped {
    #[error("cut short: the server is shutting down")]
    Shutdown,
    #[error("cut short: the publish took longer than its time limit")]
    TimeLimit,
}

/// When a long copy must stop: checked between chunks of at most [`CHUNK`] bytes, so a
/// publish ends soon after a shutdown or its time limit.
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

fn not_regular(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{} is {what}, not a regular file or folder", path.display()),
    )
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
    } else {
        "something else"
    }
}

/// Opens a regular file for reading without following a final symlink and without
/// blocking on a FIFO, then checks with `fstat` what was opened.
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                not_regular(path, "a symbolic link")
            } else {
                e
            }
        })?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        return Err(not_regular(path, kind_name(t)));
    }
    Ok(f)
}

/// What a staged product is made of: the folders (relative, parents first) and the
/// regular files (relative, in name order). A single file has one entry named "".
struct Tree {
    is_dir: bool,
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

fn tree(path: &Path) -> std::io::Result<Tree> {
    let t = std::fs::symlink_metadata(path)?.file_type();
    if t.is_file() {
        return Ok(Tree {
            is_dir: false,
            dirs: Vec::new(),
            files: vec![PathBuf::new()],
        });
    }
    if !t.is_dir() {
        return Err(not_regular(path, kind_name(t)));
    }
    let mut out = Tree {
        is_dir: true,
        dirs: Vec::new(),
        files: Vec::new(),
    };
    walk(path, path, &mut out)?;
    out.files.sort();
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Tree) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            out.dirs.push(rel);
            walk(root, &path, out)?;
        } else if kind.is_file() {
            out.files.push(rel);
        } else {
            // Following a symlink could pull in a file from outside the stage root; a
            // FIFO would block the reader.
            return Err(not_regular(&path, kind_name(kind)));
        }
    }
    Ok(())
}

fn join(base: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

/// BLAKE3 of a file, or of a folder's files (relative names and contents, in name
/// order), and the total size. Anything but regular files and folders is refused.
pub fn checksum_path(path: &Path) -> std::io::Result<(String, u64)> {
    let tree = tree(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0;
    for rel in &tree.files {
        if tree.is_dir {
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update(&[0]);
        }
        let f = open_regular(&join(path, rel))?;
        size += f.metadata()?.len();
        hasher.update_reader(f)?;
    }
    Ok((hasher.finalize().to_hex().to_string(), size))
}

/// Copies `src` (a file or a folder) to the new name `dst`, fsyncing every file and
/// folder written, and returns the checksum of what was read, in [`checksum_path`]'s
/// form: one read of the source serves both.
fn copy_hashing(src: &Path, dst: &Path, budget: &Budget) -> std::io::Result<String> {
    let tree = tree(src)?;
    let mut hasher = blake3::Hasher::new();
    if tree.is_dir {
        std::fs::create_dir(dst)?;
        for d in &tree.dirs {
            std::fs::create_dir(dst.join(d))?;
        }
    }
    let mut buf = vec![0u8; CHUNK];
    for rel in &tree.files {
        if tree.is_dir {
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update(&[0]);
        }
        let mut from = open_regular(&join(src, rel))?;
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(join(dst, rel))?;
        loop {
            budget.check()?;
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            to.write_all(&buf[..n])?;
        }
        to.sync_all()?;
    }
    if tree.is_dir {
        for d in tree.dirs.iter().rev() {
            fsync_dir(&dst.join(d))?;
        }
        fsync_dir(dst)?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes a file or a folder; never follows a symlink.
pub fn remove_path(p: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(p)?.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// Renames without replacing: fails with `AlreadyExists` when `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let f = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let t = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and nothing else.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn suffixed(name: &str, n: u32) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}_{n}.{ext}"),
        _ => format!("{name}_{n}"),
    }
}

/// The names a product may be published under in `dir`: `name`, then `name_1` ... `name_99`
/// (before the extension).
fn candidates<'a>(dir: &'a Path, name: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    std::iter::once(dir.join(name)).chain((1..100).map(move |n| dir.join(suffixed(name, n))))
}

/// Where a staged product goes: the folder of its type under the products root and its
/// file name (the staged name). The caller checks the result against the root where it
/// uses it.
pub fn destination(
    products_root: &Path,
    type_dir: &str,
    source: &Path,
) -> Result<(PathBuf, String), MoveError> {
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| MoveError::fatal(format!("{} has no file name", source.display())))?;
    let dir = products_root.join(type_dir);
    Ok((dir, name))
}

/// A complete copy of the product, with the recorded checksum, at its checked destination
/// or one of its suffixed names; `None` when there is none (or the folder is outside the
/// products root).
pub fn find_complete(
    products_root: &Path,
    dir: &Path,
    name: &str,
    checksum: &str,
) -> Option<PathBuf> {
    paths::check_destination(products_root, &dir.join(name)).ok()?;
    candidates(dir, name).find(|p| checksum_path(p).is_ok_and(|(c, _)| c == checksum))
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
}

/// The move: resolve the source inside the stage root; copy it into
/// `PRODUCTS/.contimg-tmp/`, hashing as it reads, and fsync; refuse it if it no longer
/// matches the recorded checksum; rename into place (never over an existing file), fsync
/// both folders, verify the published copy, and only then remove the source. An existing
/// destination with the same checksum is success; another one gets a suffix.
pub fn move_product(req: &MoveRequest) -> Result<PathBuf, MoveError> {
    let expected = req.checksum.ok_or_else(|| {
        MoveError::fatal(format!(
            "{} was registered without a checksum; register it again",
            req.stage_path
        ))
    })?;
    let source = paths::resolve_inside(req.stage_root, req.stage_path).map_err(MoveError::path)?;
    let (dest_dir, name) = destination(req.products_root, req.type_dir, &source)?;
    std::fs::create_dir_all(&dest_dir)
        .map_err(|e| MoveError::io("creating the products folder", e))?;
    paths::check_destination(req.products_root, &dest_dir.join(&name))
        .map_err(|e| MoveError::fatal(e.to_string()))?;
    let tmp_dir = req.products_root.join(TMP_DIR);
    std::fs::create_dir_all(&tmp_dir)
        .map_err(|e| MoveError::io("creating the temporary folder", e))?;
    paths::check_destination(req.products_root, &tmp_dir.join("x"))
        .map_err(|e| MoveError::fatal(e.to_string()))?;
    let tmp = tmp_dir.join(uuid::Uuid::new_v4().to_string());
    let result = (|| {
        let actual = copy_hashing(&source, &tmp, &req.budget).map_err(|e| {
            MoveError::io(
                &format!("copying {} into the products root", source.display()),
                e,
            )
        })?;
        if actual != expected {
            return Err(MoveError::fatal(format!(
                "staged file {} changed since it was registered (checksum {actual}, expected {expected})",
                source.display()
            )));
        }
        for candidate in candidates(&dest_dir, &name) {
            match rename_noreplace(&tmp, &candidate) {
                Ok(()) => return Ok(candidate),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if checksum_path(&candidate).is_ok_and(|(c, _)| c == actual) {
                        let _ = remove_path(&tmp);
                        return Ok(candidate);
                    }
                }
                Err(e) => return Err(MoveError::io("renaming into place", e)),
            }
        }
        Err(MoveError::fatal(format!(
            "100 products named like {name} already exist"
        )))
    })();
    let dest = match result {
        Ok(d) => d,
        Err(e) => {
            if tmp.exists() {
                let _ = remove_path(&tmp);
            }
            return Err(e);
        }
    };
    fsync_dir(&dest_dir).map_err(|e| MoveError::io("syncing the products folder", e))?;
    let _ = fsync_dir(&tmp_dir);
    let (written, _) =
        checksum_path(&dest).map_err(|e| MoveError::io("verifying the published copy", e))?;
    if written != expected {
        let _ = remove_path(&dest);
        return Err(MoveError::retryable(format!(
            "published copy of {} does not match its checksum",
            source.display()
        )));
    }
    // The copy is verified: the product is published. A staged copy that will not go away
    // is worth a warning, not a failed publish (which would retry against a half-removed
    // source).
    if let Err(e) = remove_path(&source) {
        tracing::warn!(path = %source.display(), error = %e, "published, but the staged copy could not be removed");
    }
    if let Some(parent) = source.parent() {
        let _ = fsync_dir(parent);
    }
    Ok(dest)
}

/// What recovery found of a publish a crash cut short.
pub struct Found {
    /// A complete copy with the recorded checksum at the checked destination.
    pub complete: Option<PathBuf>,
    /// The staged source, resolved inside the stage root, still has the recorded checksum.
    pub source_intact: bool,
}

/// Looks for the outcome of an interrupted publish, and removes the staged source only
/// when a complete copy with the recorded checksum was found at the checked destination
/// and the source resolves inside the stage root. Without a recorded checksum nothing is
/// complete and nothing is removed.
pub fn settle_interrupted(
    stage_root: &Path,
    products_root: &Path,
    stage_path: &str,
    type_dir: &str,
    checksum: Option<&str>,
) -> Found {
    let Some(checksum) = checksum else {
        return Found {
            complete: None,
            source_intact: false,
        };
    };
    let source = paths::resolve_inside(stage_root, stage_path).ok();
    // The destination follows from the rule, not from the event: an event naming a path
    // is a record of intent, never a permission.
    let name = Path::new(stage_path)
        .file_name()
        .map(|n| n.to_string_lossy().to_string());
    let complete = name.and_then(|name| {
        find_complete(
            products_root,
            &products_root.join(type_dir),
            &name,
            checksum,
        )
    });
    let source_intact = source
        .as_deref()
        .is_some_and(|s| checksum_path(s).is_ok_and(|(c, _)| c == checksum));
    if complete.is_some()
        && let Some(s) = &source
        && let Err(e) = remove_path(s)
    {
        tracing::warn!(path = %s.display(), error = %e, "recovered a publish, but the staged copy could not be removed");
    }
    Found {
        complete,
        source_intact,
    }
}

/// Removes temporary copies left by an interrupted move (only the owner publishes, and
/// this runs before it starts, so none is in use). Only `PRODUCTS/.contimg-tmp/` is
/// touched, and only when it is a real folder.
pub fn remove_temporaries(products_root: &Path) {
    let dir = products_root.join(TMP_DIR);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            tracing::error!(path = %dir.display(), "the temporary folder is not a folder; leaving it alone");
            return;
        }
        Err(_) => return,
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        tracing::warn!(path = %e.path().display(), "removing a temporary copy left by a crash");
        let _ = remove_path(&e.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = checksum_path(&fifo).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = open_regular(&fifo).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        // Inside a folder too.
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
    fn folder_copy_hashes_like_checksum_path() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.ms");
        std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(src.join("empty")).unwrap();
        std::fs::write(src.join("table.dat"), vec![3u8; 3 * CHUNK + 5]).unwrap();
        std::fs::write(src.join("sub/deeper/x"), b"x").unwrap();
        let cancel = AtomicBool::new(false);
        let budget = Budget {
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            cancel: &cancel,
        };
        let dst = dir.path().join("copy");
        let h = copy_hashing(&src, &dst, &budget).unwrap();
        assert_eq!(h, checksum_path(&src).unwrap().0);
        assert_eq!(h, checksum_path(&dst).unwrap().0);
        assert!(dst.join("empty").is_dir());
    }

    #[test]
    fn a_cancelled_copy_stops_between_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big");
        std::fs::write(&src, vec![1u8; 4 * CHUNK]).unwrap();
        let cancel = AtomicBool::new(true);
        let budget = Budget {
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            cancel: &cancel,
        };
        let e = copy_hashing(&src, &dir.path().join("c"), &budget).unwrap_err();
        let m = MoveError::io("copying", e);
        assert!(m.interrupted && m.retryable, "{}", m.message);
        cancel.store(false, Ordering::Relaxed);
        let late = Budget {
            deadline: Instant::now(),
            cancel: &cancel,
        };
        let e = copy_hashing(&src, &dir.path().join("d"), &late).unwrap_err();
        let m = MoveError::io("copying", e);
        assert!(!m.interrupted && m.retryable, "{}", m.message);
        assert!(m.message.contains("time limit"), "{}", m.message);
    }
}
