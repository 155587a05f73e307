//! Free space of a file system: what the ledger's reserve, `/api/status`, the metrics and
//! `contimg validate` read.

use std::path::Path;

/// (free, total) bytes of the file system holding `path`, as an unprivileged writer sees
/// them (`f_bavail`); `None` when it cannot be read.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed statvfs for the kernel to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_bavail as u64 * frsize, s.f_blocks as u64 * frsize))
}
