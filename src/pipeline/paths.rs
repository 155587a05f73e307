//! Path and id rules: no `..` component, no NUL or control character (a name that merely
//! contains `..`, `a..b.fits`, is fine), and the `data_id` rule. Where a path is used it
//! is resolved beneath its root through a handle, in `moves.rs`: there is no second,
//! path-name resolver here to be used by mistake.

use std::path::{Component, Path};

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
        assert!(check_components("a..b.fits").is_ok());
        assert!(check_components("sub/a..b.fits").is_ok());
        assert_eq!(
            check_components("../a..b.fits"),
            Err(PathError::Traversal("../a..b.fits".into()))
        );
        assert!(matches!(
            check_components("a\nb"),
            Err(PathError::ControlCharacter(_))
        ));
    }
}
