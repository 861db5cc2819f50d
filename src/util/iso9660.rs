//! A small ISO 9660 writer for cloud-init seeds: one root directory of a few small files,
//! with Joliet names (so Linux shows `user-data`, not `USERDATA.`), a volume label and an
//! application identifier. The bytes depend only on the input: every timestamp is fixed,
//! so an unchanged seed is byte-identical.
//!
//! Layout (2048-byte sectors): 0–15 system area; 16 primary volume descriptor; 17 Joliet
//! supplementary descriptor; 18 terminator; 19–22 the path tables (primary L and M,
//! Joliet L and M); 23 the primary root directory; 24 the Joliet root directory; then
//! each file from a sector of its own. [`read_label_and_app`] reads back the labels
//! [`build`] wrote (or `genisoimage` writes) from the primary descriptor alone.

/// One sector.
pub const SECTOR: usize = 2048;

const PVD_SECTOR: usize = 16;
const PATH_TABLES: usize = 19;
const ROOT_PRIMARY: u32 = 23;
const ROOT_JOLIET: u32 = 24;
const FIRST_FILE: u32 = 25;
/// Every timestamp of a seed: 2000-01-01 00:00:00 UTC.
const YEAR: u8 = 100;

/// A file of the image's root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoFile<'a> {
    /// The Joliet name (`user-data`); the primary name is derived from it.
    pub name: &'a str,
    pub data: &'a [u8],
}

/// What an image is labelled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsoLabels<'a> {
    /// The volume identifier (`cidata`), at most 16 characters.
    pub volume: &'a str,
    /// The application identifier, at most 128 ASCII characters.
    pub application: &'a str,
}

fn both16(out: &mut [u8], v: u16) {
    out[..2].copy_from_slice(&v.to_le_bytes());
    out[2..4].copy_from_slice(&v.to_be_bytes());
}

fn both32(out: &mut [u8], v: u32) {
    out[..4].copy_from_slice(&v.to_le_bytes());
    out[4..8].copy_from_slice(&v.to_be_bytes());
}

/// `text` into `field`, padded with spaces (single bytes, or UCS-2 for Joliet).
fn put_text(field: &mut [u8], text: &str, joliet: bool) {
    if joliet {
        let units: Vec<u16> = text.encode_utf16().collect();
        for (i, pair) in field.chunks_mut(2).enumerate() {
            let unit = units.get(i).copied().unwrap_or(0x20);
            if pair.len() == 2 {
                pair.copy_from_slice(&unit.to_be_bytes());
            } else {
                pair[0] = 0;
            }
        }
    } else {
        field.fill(b' ');
        let n = text.len().min(field.len());
        field[..n].copy_from_slice(&text.as_bytes()[..n]);
    }
}

/// The primary (ISO level 1) name of a file: upper case, `[A-Z0-9_]`, 8 characters, `.;1`.
fn primary_name(name: &str) -> Vec<u8> {
    let mut base: Vec<u8> = name
        .bytes()
        .filter(|b| b.is_ascii_alphanumeric())
        .map(|b| b.to_ascii_uppercase())
        .take(8)
        .collect();
    if base.is_empty() {
        base.push(b'_');
    }
    base.extend_from_slice(b".;1");
    base
}

fn joliet_name(name: &str) -> Vec<u8> {
    name.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// One directory record.
fn dir_record(ident: &[u8], extent: u32, len: u32, directory: bool) -> Vec<u8> {
    let size = 33 + ident.len() + (ident.len() + 1) % 2;
    let mut r = vec![0u8; size];
    r[0] = size as u8;
    both32(&mut r[2..10], extent);
    both32(&mut r[10..18], len);
    r[18..25].copy_from_slice(&[YEAR, 1, 1, 0, 0, 0, 0]);
    r[25] = if directory { 2 } else { 0 };
    both16(&mut r[28..32], 1);
    r[32] = ident.len() as u8;
    r[33..33 + ident.len()].copy_from_slice(ident);
    r
}

/// A root directory: `.`, `..`, then the files (already sorted) at their extents.
fn root_dir(root: u32, files: &[(Vec<u8>, u32, u32)]) -> Vec<u8> {
    let mut sector = Vec::with_capacity(SECTOR);
    sector.extend(dir_record(&[0], root, SECTOR as u32, true));
    sector.extend(dir_record(&[1], root, SECTOR as u32, true));
    for (ident, extent, len) in files {
        sector.extend(dir_record(ident, *extent, *len, false));
    }
    sector.resize(SECTOR, 0);
    sector
}

/// A path table of the root alone, little- or big-endian.
fn path_table(root: u32, big_endian: bool) -> [u8; 10] {
    let mut t = [0u8; 10];
    t[0] = 1;
    let extent = if big_endian {
        root.to_be_bytes()
    } else {
        root.to_le_bytes()
    };
    t[2..6].copy_from_slice(&extent);
    let parent = if big_endian {
        1u16.to_be_bytes()
    } else {
        1u16.to_le_bytes()
    };
    t[6..8].copy_from_slice(&parent);
    t
}

/// A volume descriptor: primary (`joliet` false) or the Joliet supplementary one.
fn volume_descriptor(labels: &IsoLabels, sectors: u32, joliet: bool) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = if joliet { 2 } else { 1 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    put_text(&mut d[8..40], "LINUX", joliet);
    put_text(&mut d[40..72], labels.volume, joliet);
    both32(&mut d[80..88], sectors);
    if joliet {
        // UCS-2 level 3.
        d[88..91].copy_from_slice(b"%/E");
    }
    both16(&mut d[120..124], 1);
    both16(&mut d[124..128], 1);
    both16(&mut d[128..132], SECTOR as u16);
    both32(&mut d[132..140], 10);
    let (l_table, m_table) = if joliet {
        (PATH_TABLES as u32 + 2, PATH_TABLES as u32 + 3)
    } else {
        (PATH_TABLES as u32, PATH_TABLES as u32 + 1)
    };
    d[140..144].copy_from_slice(&l_table.to_le_bytes());
    d[148..152].copy_from_slice(&m_table.to_be_bytes());
    let root = if joliet { ROOT_JOLIET } else { ROOT_PRIMARY };
    d[156..190].copy_from_slice(&dir_record(&[0], root, SECTOR as u32, true));
    for range in [190..318, 318..446, 446..574, 702..739, 739..776, 776..813] {
        put_text(&mut d[range], "", joliet);
    }
    // Read back by `read_label_and_app` from the primary descriptor.
    put_text(&mut d[574..702], labels.application, joliet);
    for (i, at) in [813, 830, 847, 864].into_iter().enumerate() {
        let date: &[u8; 16] = if i < 2 {
            b"2000010100000000"
        } else {
            b"0000000000000000"
        };
        d[at..at + 16].copy_from_slice(date);
        d[at + 16] = 0;
    }
    d[881] = 1;
    d
}

/// The image of `files` (at most a few, each named once) with `labels`.
pub fn build(files: &[IsoFile], labels: &IsoLabels) -> Vec<u8> {
    let mut sorted: Vec<&IsoFile> = files.iter().collect();
    sorted.sort_by_key(|f| f.name);
    let mut extent = FIRST_FILE;
    let mut primary = Vec::new();
    let mut joliet = Vec::new();
    for f in &sorted {
        let len = f.data.len() as u32;
        primary.push((primary_name(f.name), extent, len));
        joliet.push((joliet_name(f.name), extent, len));
        extent += (f.data.len().div_ceil(SECTOR) as u32).max(1);
    }
    let sectors = extent;
    let mut out = vec![0u8; PVD_SECTOR * SECTOR];
    out.extend(volume_descriptor(labels, sectors, false));
    out.extend(volume_descriptor(labels, sectors, true));
    let mut terminator = vec![0u8; SECTOR];
    terminator[0] = 255;
    terminator[1..6].copy_from_slice(b"CD001");
    terminator[6] = 1;
    out.extend(terminator);
    for (root, big_endian) in [
        (ROOT_PRIMARY, false),
        (ROOT_PRIMARY, true),
        (ROOT_JOLIET, false),
        (ROOT_JOLIET, true),
    ] {
        let mut sector = path_table(root, big_endian).to_vec();
        sector.resize(SECTOR, 0);
        out.extend(sector);
    }
    out.extend(root_dir(ROOT_PRIMARY, &primary));
    out.extend(root_dir(ROOT_JOLIET, &joliet));
    for f in &sorted {
        let start = out.len();
        out.extend_from_slice(f.data);
        let used = (out.len() - start).div_ceil(SECTOR).max(1) * SECTOR;
        out.resize(start + used, 0);
    }
    out
}

/// The volume label and application identifier (trailing spaces trimmed) in `pvd`, the
/// sector at [`PVD_OFFSET`] of an image; `None` when it is not an ISO 9660 primary
/// volume descriptor.
pub fn read_label_and_app(pvd: &[u8]) -> Option<(String, String)> {
    let d = pvd.get(..SECTOR)?;
    if d[0] != 1 || &d[1..6] != b"CD001" {
        return None;
    }
    let text = |r: std::ops::Range<usize>| {
        String::from_utf8_lossy(&d[r])
            .trim_end_matches([' ', '\0'])
            .to_string()
    };
    Some((text(40..72), text(574..702)))
}

/// Where the primary volume descriptor [`read_label_and_app`] reads starts.
pub const PVD_OFFSET: u64 = (PVD_SECTOR * SECTOR) as u64;

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of the Joliet root directory: (name, content), read back from `image`.
    fn joliet_files(image: &[u8]) -> Vec<(String, Vec<u8>)> {
        let svd = &image[17 * SECTOR..18 * SECTOR];
        assert_eq!(svd[0], 2);
        assert_eq!(&svd[88..91], b"%/E");
        let root = u32::from_le_bytes(svd[158..162].try_into().unwrap()) as usize;
        let dir = &image[root * SECTOR..(root + 1) * SECTOR];
        let mut out = Vec::new();
        let mut at = 0;
        while at < dir.len() && dir[at] != 0 {
            let len = dir[at] as usize;
            let rec = &dir[at..at + len];
            let name_len = rec[32] as usize;
            let ident = &rec[33..33 + name_len];
            if name_len > 1 {
                let units: Vec<u16> = ident
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                let extent = u32::from_le_bytes(rec[2..6].try_into().unwrap()) as usize;
                let size = u32::from_le_bytes(rec[10..14].try_into().unwrap()) as usize;
                // Both-endian fields agree.
                assert_eq!(
                    u32::from_be_bytes(rec[14..18].try_into().unwrap()) as usize,
                    size
                );
                out.push((
                    String::from_utf16(&units).unwrap(),
                    image[extent * SECTOR..extent * SECTOR + size].to_vec(),
                ));
            }
            at += len;
        }
        out
    }

    fn sample() -> Vec<u8> {
        build(
            &[
                IsoFile {
                    name: "user-data",
                    data: b"#cloud-config\nhostname: a\n",
                },
                IsoFile {
                    name: "meta-data",
                    data: b"instance-id: iid-1\n",
                },
            ],
            &IsoLabels {
                volume: "cidata",
                application: "VMSYNC SEED ABC",
            },
        )
    }

    #[test]
    fn round_trip_names_content_and_labels() {
        let image = sample();
        assert_eq!(image.len() % SECTOR, 0);
        assert_eq!(
            joliet_files(&image),
            vec![
                ("meta-data".to_string(), b"instance-id: iid-1\n".to_vec()),
                (
                    "user-data".to_string(),
                    b"#cloud-config\nhostname: a\n".to_vec()
                ),
            ]
        );
        assert_eq!(
            read_label_and_app(&image[PVD_OFFSET as usize..]),
            Some(("cidata".to_string(), "VMSYNC SEED ABC".to_string()))
        );
        // The volume space size is the image's.
        let sectors = u32::from_le_bytes(
            image[16 * SECTOR + 80..16 * SECTOR + 84]
                .try_into()
                .unwrap(),
        );
        assert_eq!(sectors as usize * SECTOR, image.len());
    }

    #[test]
    fn same_input_same_bytes_other_input_other_bytes() {
        assert_eq!(sample(), sample());
        let other = build(
            &[IsoFile {
                name: "user-data",
                data: b"x",
            }],
            &IsoLabels {
                volume: "cidata",
                application: "",
            },
        );
        assert_ne!(sample(), other);
    }

    #[test]
    fn a_file_longer_than_a_sector_is_whole() {
        let big = vec![b'y'; 5000];
        let image = build(
            &[
                IsoFile {
                    name: "user-data",
                    data: &big,
                },
                IsoFile {
                    name: "network-config",
                    data: b"",
                },
            ],
            &IsoLabels {
                volume: "cidata",
                application: "",
            },
        );
        let files = joliet_files(&image);
        assert_eq!(files[0], ("network-config".to_string(), Vec::new()));
        assert_eq!(files[1].1, big);
    }

    #[test]
    fn not_an_iso_reads_as_none() {
        assert_eq!(read_label_and_app(&[0u8; SECTOR]), None);
        assert_eq!(read_label_and_app(b"short"), None);
    }

    #[test]
    fn primary_names_are_level_one() {
        assert_eq!(primary_name("user-data"), b"USERDATA.;1");
        assert_eq!(primary_name("network-config"), b"NETWORKC.;1");
        assert_eq!(primary_name("--"), b"_.;1");
    }
}
