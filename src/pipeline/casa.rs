//! What makes a folder a CASA table, as the safeguards check a Measurement Set and the
//! calibration tables a group used: the table description `table.dat` (an AipsIO object:
//! the magic number `0xBEBEBEBE`, then its length, which the file must hold), the
//! `table.info` that names the table's type, and at least the first storage manager file
//! `table.f0`. A bare folder, a truncated `table.dat`, a missing data file or a table of
//! another type is refused with what is wrong.

use std::io::Read;
use std::path::Path;

/// The AipsIO magic number at the start of `table.dat`.
pub const AIPSIO_MAGIC: [u8; 4] = [0xbe, 0xbe, 0xbe, 0xbe];

/// `Type = ...` in `table.info` of a Measurement Set.
pub const MEASUREMENT_SET: &str = "Measurement Set";
/// ... and of a calibration table.
pub const CALIBRATION: &str = "Calibration";

/// Checks that `dir` is a CASA table of type `kind`; returns the `SubType` (for a
/// calibration table, its Jones type: `G Jones`, `B Jones`...).
pub fn check_table(dir: &Path, kind: &str) -> Result<String, String> {
    let show = dir.display();
    if !dir.is_dir() {
        return Err(format!("{show} is not on disk (or not a folder)"));
    }
    let dat = dir.join("table.dat");
    let size = std::fs::metadata(&dat)
        .map_err(|e| format!("{show}: no table.dat ({e})"))?
        .len();
    let mut head = Vec::with_capacity(8);
    std::fs::File::open(&dat)
        .and_then(|f| f.take(8).read_to_end(&mut head))
        .map_err(|e| format!("{show}: table.dat unreadable ({e})"))?;
    if head.len() < 4 || head[..4] != AIPSIO_MAGIC {
        return Err(format!(
            "{show}: table.dat is not a CASA table description (starts {:02x?}, not be be be be)",
            &head[..head.len().min(4)]
        ));
    }
    if head.len() < 8 {
        return Err(format!("{show}: table.dat is truncated ({size} bytes)"));
    }
    let length = u64::from(u32::from_be_bytes([head[4], head[5], head[6], head[7]]));
    if size < length {
        return Err(format!(
            "{show}: table.dat is truncated ({size} bytes of the {length} it declares)"
        ));
    }
    let info = std::fs::read_to_string(dir.join("table.info"))
        .map_err(|e| format!("{show}: no table.info ({e})"))?;
    let found = info_field(&info, "Type").unwrap_or_default();
    if found != kind {
        return Err(format!(
            "{show}: table.info says Type = {found:?}, not {kind:?}"
        ));
    }
    if !dir.join("table.f0").is_file() {
        return Err(format!(
            "{show}: no table.f0 (the table's data are missing)"
        ));
    }
    Ok(info_field(&info, "SubType").unwrap_or_default())
}

/// A field of `table.info` (`Type = Calibration`).
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.trim_start().strip_prefix('='))
        .map(|v| v.trim().to_string())
}

/// The `Type` a folder's `table.info` names, if it has one: which tables a stage left
/// are calibration tables, before [`check_table`] checks them whole.
pub fn table_type(dir: &Path) -> Option<String> {
    info_field(
        &std::fs::read_to_string(dir.join("table.info")).ok()?,
        "Type",
    )
}

/// Writes the skeleton of a CASA table the checks above accept (the simulator's tables:
/// they hold no data a CASA program could read, and say so in their description).
pub fn write_skeleton(dir: &Path, kind: &str, subtype: &str, note: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let body = format!("contimg-sim table: {note}\n");
    let mut dat = AIPSIO_MAGIC.to_vec();
    dat.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
    dat.extend_from_slice(body.as_bytes());
    std::fs::write(dir.join("table.dat"), dat)?;
    std::fs::write(
        dir.join("table.info"),
        format!("Type = {kind}\nSubType = {subtype}\n\n{note}\n"),
    )?;
    std::fs::write(dir.join("table.f0"), vec![0u8; 512])?;
    std::fs::write(dir.join("table.lock"), b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeletons_pass_and_every_breakage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("g.G");
        write_skeleton(&t, CALIBRATION, "G Jones", "gains").unwrap();
        assert_eq!(check_table(&t, CALIBRATION).unwrap(), "G Jones");
        let e = check_table(&t, MEASUREMENT_SET).unwrap_err();
        assert!(e.contains("not \"Measurement Set\""), "{e}");
        let dat = std::fs::read(t.join("table.dat")).unwrap();
        std::fs::write(t.join("table.dat"), &dat[..dat.len() - 3]).unwrap();
        assert!(
            check_table(&t, CALIBRATION)
                .unwrap_err()
                .contains("truncated")
        );
        std::fs::write(t.join("table.dat"), b"contimg-sim table GAIN\n").unwrap();
        assert!(
            check_table(&t, CALIBRATION)
                .unwrap_err()
                .contains("not a CASA table")
        );
        std::fs::write(t.join("table.dat"), &dat).unwrap();
        std::fs::remove_file(t.join("table.f0")).unwrap();
        assert!(
            check_table(&t, CALIBRATION)
                .unwrap_err()
                .contains("no table.f0")
        );
        std::fs::remove_file(t.join("table.info")).unwrap();
        assert!(
            check_table(&t, CALIBRATION)
                .unwrap_err()
                .contains("no table.info")
        );
        assert!(
            check_table(&dir.path().join("gone"), CALIBRATION)
                .unwrap_err()
                .contains("not on disk")
        );
    }
}
