//! Path and id rules: sources inside the stage root, destinations inside the products
//! root (after resolving symlinks), no `..` component, no NUL or control character; a
//! name that merely contains `..` (`a..b.fits`) is fine.

use std::path::{Component, Path, PathBuf};

use crate::events::catalogue::DataId;

/// Why a path or id was refused. Rejected input: HTTP 400/422.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("data_id must be 1 to 192 characters of letters, digits and ._:+- (got {0:?})")]
    BadDataId(String),
    #[error("path {0:?} holds a NUL or control character")]
    ControlCharacter(String),
    #[error("path {0:?} has a '..' component")]
    Traversal(String),
    #[error("{path:?} is outside {root}")]
    OutsideRoot { path: String, root: String },
    #[error("{0} does not exist")]
    Missing(String),
    #[error("cannot resolve {path}: {reason}")]
    Unresolvable { path: String, reason: String },
}

/// Longest `data_id`: `product-` plus this fills a stream name's 200 characters.
pub const MAX_DATA_ID: usize = DataId::MAX;

/// The `data_id` rule ([`DataId::parse`]) as a path error.
pub fn data_id(id: &str) -> Result<DataId, PathError> {
    DataId::parse(id).map_err(PathError::BadDataId)
}

/// Checks a `data_id` ([`DataId::parse`]).
pub fn validate_data_id(id: &str) -> Result<(), PathError> {
    data_id(id).map(|_| ())
}

/// Refuses control characters and `..` components; `a..b.fits` passes.
pub fn check_components(path: &str) -> Result<(), PathError> {
    if path.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter(path.escape_debug().to_string()));
    }
    if Path::new(path)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(PathError::Traversal(path.to_string()));
    }
    Ok(())
}

/// Resolves an existing path (symlinks included) and checks it lies inside `root`.
/// A relative path is taken relative to `root`.
pub fn resolve_inside(root: &Path, path: &str) -> Result<PathBuf, PathError> {
    check_components(path)?;
    let root_real = root.canonicalize().map_err(|e| PathError::Unresolvable {
        path: root.display().to_string(),
        reason: e.to_string(),
    })?;
    let joined = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        root_real.join(path)
    };
    let real = joined.canonicalize().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PathError::Missing(joined.display().to_string())
        } else {
            PathError::Unresolvable {
                path: joined.display().to_string(),
                reason: e.to_string(),
            }
        }
    })?;
    if !real.starts_with(&root_real) || real == root_real {
        return Err(PathError::OutsideRoot {
            path: path.to_string(),
            root: root_real.display().to_string(),
        });
    }
    Ok(real)
}

/// Checks that a destination (which may not exist yet) lies inside `root`: its parent
/// folder, resolved, must be inside the resolved root.
pub fn check_destination(root: &Path, dest: &Path) -> Result<(), PathError> {
    check_components(&dest.to_string_lossy())?;
    let root_real = root.canonicalize().map_err(|e| PathError::Unresolvable {
        path: root.display().to_string(),
        reason: e.to_string(),
    })?;
    let parent = dest.parent().ok_or_else(|| PathError::OutsideRoot {
        path: dest.display().to_string(),
        root: root_real.display().to_string(),
    })?;
    let parent_real = parent.canonicalize().map_err(|e| PathError::Unresolvable {
        path: parent.display().to_string(),
        reason: e.to_string(),
    })?;
    if !parent_real.starts_with(&root_real) {
        return Err(PathError::OutsideRoot {
            path: dest.display().to_string(),
            root: root_real.display().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ids() {
        for ok in ["img_2026-11-30T10:00:00", "a..b.fits", "x+y-z.ms", "A1"] {
            assert!(validate_data_id(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(193);
        assert!(validate_data_id(&"x".repeat(192)).is_ok());
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a\0b",
            "../etc",
            long.as_str(),
            "é",
        ] {
            assert!(validate_data_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dotdot_inside_a_name_is_not_traversal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a..b.fits"), b"x").unwrap();
        assert!(resolve_inside(dir.path(), "a..b.fits").is_ok());
        assert_eq!(
            resolve_inside(dir.path(), "../a..b.fits"),
            Err(PathError::Traversal("../a..b.fits".into()))
        );
        assert!(matches!(
            resolve_inside(dir.path(), "a\nb"),
            Err(PathError::ControlCharacter(_))
        ));
        assert!(matches!(
            resolve_inside(dir.path(), "nope.fits"),
            Err(PathError::Missing(_))
        ));
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        assert!(matches!(
            resolve_inside(root.path(), "link"),
            Err(PathError::OutsideRoot { .. })
        ));
        let abs = outside.path().join("secret");
        assert!(matches!(
            resolve_inside(root.path(), abs.to_str().unwrap()),
            Err(PathError::OutsideRoot { .. })
        ));
    }
}
