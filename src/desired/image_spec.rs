//! Base images (`[[image]]` of the manifest) and the disks made from them
//! (`[[vm.disk]] image = "NAME"`): the entries checked and typed, the URL rules, and where
//! on the host an image lives (`[policy] image_dir`, named by its sha256). Pure: the
//! download is `host::image_fetch`, the file handling `host::image_store`.
//!
//! Who decides what: the repository's author names the image, its URL and its sha256; the
//! host's operator decides where images may come from (`[policy] image_urls`, default
//! `https://` only; link-local and cloud metadata hosts only with
//! `allow_link_local_hosts`) and where they are kept (`image_dir`).

use serde::Deserialize;
use toml::Spanned;

use crate::desired::disk_spec::{Compression, DiskFormat, DiskSpec, ImageSpec};
use crate::desired::host_policy_settings::ImagePolicy;
use crate::desired::{host_access, path_rule};

/// An `[[image]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    name: Spanned<String>,
    url: Spanned<String>,
    sha256: Spanned<String>,
    format: Option<DiskFormat>,
}

impl RawImage {
    /// The entry's name as written.
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }
}

/// Parses the `[[image]]` tables. `report(span, field, message)` records a problem;
/// `line(pos)` is the line of a byte offset.
pub fn parse(
    raw: Vec<RawImage>,
    report: &mut dyn FnMut(std::ops::Range<usize>, &str, String),
    line: &mut dyn FnMut(usize) -> usize,
) -> Vec<ImageSpec> {
    let mut images: Vec<ImageSpec> = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in raw.into_iter().enumerate() {
        let name = r.name.get_ref().clone();
        let mut bad = |span, field: &str, message: String| {
            let shown = path_rule::shown(&name, 80);
            report(
                span,
                &format!("image[{i}].{field}"),
                format!("image '{shown}': {message}"),
            )
        };
        let before_name = !names.insert(name.clone());
        if let Err(message) = path_rule::check_name("image", &name) {
            bad(r.name.span(), "name", message);
        } else if before_name {
            bad(
                r.name.span(),
                "name",
                "another [[image]] has this name".into(),
            );
        }
        let url = check_url(r.url.get_ref()).map_err(|m| bad(r.url.span(), "url", m));
        let sha = check_sha256(r.sha256.get_ref()).map_err(|m| bad(r.sha256.span(), "sha256", m));
        if let (Ok((compression, inferred)), Ok(sha256)) = (url, sha) {
            images.push(ImageSpec {
                name,
                line: line(r.name.span().start),
                url: r.url.into_inner(),
                sha256,
                format: r.format.unwrap_or(inferred),
                compression,
            });
        }
    }
    images
}

/// A sha256 as 64 hex digits (either case), returned in lowercase.
pub fn check_sha256(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "'{}' is not a sha256: expected 64 hex digits",
            path_rule::shown(text, 80)
        ))
    }
}

/// The parts of an image URL vmsync looks at.
struct UrlParts<'u> {
    /// `scheme://authority`, the scheme lowercased by the caller's check.
    authority: &'u str,
    host: &'u str,
    path: &'u str,
}

/// Splits `url` into authority, host and path, or says why it is not an image URL.
fn split_url(url: &str) -> Result<UrlParts<'_>, String> {
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("the URL contains whitespace or control characters".into());
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &url[8..]
    } else if lower.starts_with("http://") {
        &url[7..]
    } else {
        return Err(format!(
            "'{}' is not an http:// or https:// URL",
            path_rule::shown(url, 120)
        ));
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err(
            "credentials in an image URL are refused (they would be shown in plans and logs)"
                .into(),
        );
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    if host.is_empty() {
        return Err(format!("'{}' names no host", path_rule::shown(url, 120)));
    }
    let path = rest[end..].split(['?', '#']).next().unwrap_or("");
    Ok(UrlParts {
        authority: &url[..url.len() - rest.len() + end],
        host,
        path,
    })
}

/// Checks an image URL's syntax; returns the compression and the format its path implies.
pub fn check_url(url: &str) -> Result<(Compression, DiskFormat), String> {
    let parts = split_url(url)?;
    let path = parts.path.to_ascii_lowercase();
    let (compression, stem) = if let Some(stem) = path.strip_suffix(".gz") {
        (Compression::Gzip, stem)
    } else if let Some(stem) = path.strip_suffix(".xz") {
        (Compression::Xz, stem)
    } else {
        (Compression::None, path.as_str())
    };
    let format = if stem.ends_with(".raw") {
        DiskFormat::Raw
    } else {
        DiskFormat::Qcow2
    };
    Ok((compression, format))
}

/// Whether `url` starts with the allowed `prefix`. A prefix that ends inside the host
/// part (`http://127.0.0.1`) matches that host only (any port), never a longer host name
/// (`http://127.0.0.10`); a prefix with a path matches by its characters.
fn prefix_allows(prefix: &str, url: &str) -> bool {
    let (Some(head), Some(rest)) = (url.get(..prefix.len()), url.get(prefix.len()..)) else {
        return false;
    };
    if !head.eq_ignore_ascii_case(prefix) {
        return false;
    }
    let in_authority = prefix
        .split_once("://")
        .is_some_and(|(_, after)| !after.is_empty() && !after.contains('/'));
    !in_authority || rest.is_empty() || rest.starts_with(['/', ':', '?', '#'])
}

/// Checks `url` (or a redirect's target) against the host's policy: below an entry of
/// `[policy] image_urls`, and no link-local or cloud metadata host unless
/// `allow_link_local_hosts`. The message names the key that would allow it.
pub fn check_allowed(
    url: &str,
    policy: &ImagePolicy,
    allow_link_local: bool,
) -> Result<(), String> {
    let parts = split_url(url)?;
    if !policy.urls.iter().any(|p| prefix_allows(p, url)) {
        let allowed = policy
            .urls
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(format!(
            "'{}' is not below an allowed image URL ({}); add a prefix to [policy] image_urls to allow it",
            path_rule::shown(url, 120),
            if allowed.is_empty() { "none" } else { &allowed }
        ));
    }
    if let Some(why) = host_access::link_local(parts.host)
        && !allow_link_local
    {
        return Err(format!(
            "a download from '{}' ({why}) is refused by this host's policy (set [policy] allow_link_local_hosts = true to allow it)",
            path_rule::shown(parts.host, 80)
        ));
    }
    Ok(())
}

/// `disk` with its image (if any) placed in the image directory `dir`.
pub fn placed(disk: &DiskSpec, dir: &std::path::Path) -> DiskSpec {
    DiskSpec {
        image: disk.image.as_ref().map(|i| i.placed(dir)),
        ..disk.clone()
    }
}

/// The value of a `Location` header resolved against the URL it answered.
pub fn resolve_location(base: &str, location: &str) -> Option<String> {
    if location.contains("://") {
        return Some(location.to_string());
    }
    let parts = split_url(base).ok()?;
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next()?;
        return Some(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Some(format!("{}{location}", parts.authority));
    }
    let dir = parts.path.rsplit_once('/').map_or("", |(d, _)| d);
    Some(format!("{}{dir}/{location}", parts.authority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::disk_spec::DiskImage;
    use std::path::Path;

    fn parsed(toml_text: &str) -> (Vec<ImageSpec>, Vec<(String, String)>) {
        #[derive(Deserialize)]
        struct Doc {
            image: Vec<RawImage>,
        }
        let doc: Doc = toml::from_str(toml_text).unwrap();
        let mut problems = Vec::new();
        let images = parse(
            doc.image,
            &mut |_, field, message| problems.push((field.to_string(), message)),
            &mut |_| 1,
        );
        (images, problems)
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789ABCDEF";

    #[test]
    fn entries_are_typed_and_formats_inferred() {
        let text = format!(
            "[[image]]\nname = \"a\"\nurl = \"https://x.org/d/debian.qcow2\"\nsha256 = \"{SHA}\"\n\
             [[image]]\nname = \"b\"\nurl = \"https://x.org/disk.raw.xz?x=1\"\nsha256 = \"{SHA}\"\n\
             [[image]]\nname = \"c\"\nurl = \"http://x.org/disk.img.gz\"\nsha256 = \"{SHA}\"\nformat = \"raw\"\n"
        );
        let (images, problems) = parsed(&text);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(images[0].format, DiskFormat::Qcow2);
        assert_eq!(images[0].compression, Compression::None);
        assert_eq!(images[0].sha256, SHA.to_ascii_lowercase());
        assert_eq!(images[1].format, DiskFormat::Raw);
        assert_eq!(images[1].compression, Compression::Xz);
        assert_eq!(images[2].format, DiskFormat::Raw);
        assert_eq!(images[2].compression, Compression::Gzip);
        assert_eq!(
            images[0].file_name(),
            format!("{}.qcow2", SHA.to_ascii_lowercase())
        );
        let disk = DiskImage::new(images[0].clone(), false).placed(Path::new("/srv/img"));
        assert_eq!(disk.file, Path::new("/srv/img").join(images[0].file_name()));
    }

    #[test]
    fn bad_entries_name_image_and_field() {
        let text = format!(
            "[[image]]\nname = \"a\"\nurl = \"ftp://x.org/a.qcow2\"\nsha256 = \"{SHA}\"\n\
             [[image]]\nname = \"b\"\nurl = \"https://x.org/b\"\nsha256 = \"abc\"\n\
             [[image]]\nname = \"b\"\nurl = \"https://u:p@x.org/b\"\nsha256 = \"{SHA}\"\n\
             [[image]]\nname = \"../c\"\nurl = \"https:///b\"\nsha256 = \"{}\"\n",
            "g".repeat(64)
        );
        let (images, problems) = parsed(&text);
        assert!(images.is_empty());
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "image[0].url",
                "image[1].sha256",
                "image[2].name",
                "image[2].url",
                "image[3].name",
                "image[3].url",
                "image[3].sha256"
            ]
        );
        assert!(
            problems[0].1.starts_with("image 'a': "),
            "{}",
            problems[0].1
        );
        assert!(problems[3].1.contains("credentials"), "{}", problems[3].1);
    }

    #[test]
    fn policy_prefixes_and_link_local_hosts() {
        let policy = ImagePolicy::default();
        assert!(check_allowed("https://cloud.debian.org/x.qcow2", &policy, false).is_ok());
        let err = check_allowed("http://cloud.debian.org/x.qcow2", &policy, false).unwrap_err();
        assert!(err.contains("[policy] image_urls"), "{err}");
        let local = ImagePolicy {
            urls: vec![
                "http://127.0.0.1".into(),
                "https://m.example.org/images/".into(),
            ],
            ..ImagePolicy::default()
        };
        for ok in [
            "http://127.0.0.1/a.qcow2",
            "http://127.0.0.1:8080/a.qcow2",
            "HTTP://127.0.0.1/a",
            "https://m.example.org/images/debian.raw",
        ] {
            assert!(check_allowed(ok, &local, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://127.0.0.10/a",
            "http://127.0.0.1.evil.org/a",
            "https://m.example.org/other/x",
            "https://cloud.debian.org/x",
        ] {
            assert!(check_allowed(bad, &local, false).is_err(), "{bad}");
        }
        let meta = "https://169.254.169.254/latest";
        let err = check_allowed(meta, &policy, false).unwrap_err();
        assert!(err.contains("allow_link_local_hosts"), "{err}");
        assert!(check_allowed(meta, &policy, true).is_ok());
        let v6 = "https://[fe80::1]:8443/x";
        assert!(check_allowed(v6, &policy, false).is_err());
    }

    #[test]
    fn redirect_locations_resolve() {
        let base = "http://h:8/a/b/img.qcow2?x";
        assert_eq!(
            resolve_location(base, "/c.qcow2").unwrap(),
            "http://h:8/c.qcow2"
        );
        assert_eq!(
            resolve_location(base, "c.qcow2").unwrap(),
            "http://h:8/a/b/c.qcow2"
        );
        assert_eq!(resolve_location(base, "//o/c").unwrap(), "http://o/c");
        assert_eq!(
            resolve_location(base, "https://o/c").unwrap(),
            "https://o/c"
        );
    }
}
