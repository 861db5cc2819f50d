//! Values the manifest and the agent's configuration share, parsed once at the edge:
//! sizes (`"20G"`), timeouts (`"2m"`), absolute paths.

use std::path::PathBuf;

use crate::desired::path_rule;

/// The default graceful-shutdown timeout of a VM.
pub const DEFAULT_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Parses a timeout like "120s", "2m" or "90" (seconds).
pub fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration like \"120s\" or \"2m\": {e}"))
}

/// Checks that `raw` is a host path by the one path rule (`path_rule::absolute`:
/// absolute, no `.`/`..`, no control characters, bounded length) and returns it.
pub fn absolute_path(raw: &str) -> Result<PathBuf, String> {
    path_rule::absolute(raw)
}

/// Formats a byte count for messages: "20 GiB", "1.5 GiB (1610612736 bytes)", "1000 bytes".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        let scale = 1u64 << shift;
        if bytes >= scale {
            return if bytes.is_multiple_of(scale) {
                format!("{} {unit}", bytes >> shift)
            } else {
                format!("{:.1} {unit} ({bytes} bytes)", bytes as f64 / scale as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

/// Parses a size: a whole number of bytes with an optional binary unit K, M, G or T
/// (case-insensitive, optionally followed by "iB" or "B": "20G", "20GiB", "20gb" all mean
/// 20 × 2³⁰), or a plain number or `<n>B` for bytes. No fractions, signs or spaces; the
/// result must be > 0 and fit in a u64. The error message names the bad value.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    let invalid = || {
        format!(
            "invalid size '{s}': expected a whole number with an optional binary unit \
             K, M, G or T (e.g. 20G, 512M, 4096)"
        )
    };
    if digits.is_empty() {
        return Err(invalid());
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    let too_large = || format!("size '{s}' is too large");
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    if number == 0 {
        return Err(format!("size '{s}' must be greater than zero"));
    }
    number.checked_mul(1u64 << shift).ok_or_else(too_large)
}
