//! The `[vm.cloud_init]` table of the manifest, as written and checked: which repository
//! files make the VM's NoCloud seed and what a changed seed does to a running VM. The
//! seed itself is built in `seed_spec`.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use crate::repo::files::check_repo_path;

/// What a changed seed does to a running VM (`on_change`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeedOnChange {
    /// The seed is rebuilt; a running guest is left alone and reported pending restart
    /// (it reads the new seed when it is next started).
    #[default]
    NextBoot,
    /// The seed is rebuilt and the VM restarted gracefully.
    Restart,
    /// The first seed is kept; a changed one is not written.
    Never,
}

impl SeedOnChange {
    pub fn as_str(self) -> &'static str {
        match self {
            SeedOnChange::NextBoot => "next-boot",
            SeedOnChange::Restart => "restart",
            SeedOnChange::Never => "never",
        }
    }
}

/// `[vm.cloud_init]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCloudInit {
    user_data: Option<Spanned<String>>,
    meta_data: Option<Spanned<String>>,
    network_config: Option<Spanned<String>>,
    on_change: Option<Spanned<String>>,
}

/// `[vm.cloud_init]`, checked: repository paths (a path ending in `.j2` is a template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInitSpec {
    /// `user_data` (required).
    pub user_data: String,
    /// `meta_data`; default: `instance-id` and `local-hostname` written by vmsync.
    pub meta_data: Option<String>,
    /// `network_config`; default: none (cloud-init's own default networking).
    pub network_config: Option<String>,
    /// `on_change`; default "next-boot".
    pub on_change: SeedOnChange,
}

impl CloudInitSpec {
    /// Checks and types the table; `problem(span, field, message)` reports a bad value
    /// (`field` under `cloud_init.`), `at` is where a missing key is reported. `None`
    /// when one was reported.
    pub fn parse(
        raw: &RawCloudInit,
        at: Range<usize>,
        mut problem: impl FnMut(Range<usize>, &str, String),
    ) -> Option<CloudInitSpec> {
        let mut ok = true;
        let mut path = |value: &Option<Spanned<String>>, field: &str| match value {
            None => None,
            Some(v) => match check_repo_path(v.get_ref()) {
                Ok(_) => Some(v.get_ref().clone()),
                Err(e) => {
                    problem(v.span(), field, e.to_string());
                    ok = false;
                    None
                }
            },
        };
        let user_data = path(&raw.user_data, "cloud_init.user_data");
        let meta_data = path(&raw.meta_data, "cloud_init.meta_data");
        let network_config = path(&raw.network_config, "cloud_init.network_config");
        if raw.user_data.is_none() {
            problem(
                at,
                "cloud_init.user_data",
                "missing 'user_data' (a file in the repository; a template when it ends in .j2)"
                    .into(),
            );
            ok = false;
        }
        let on_change = match &raw.on_change {
            None => SeedOnChange::default(),
            Some(v) => match v.get_ref().as_str() {
                "next-boot" => SeedOnChange::NextBoot,
                "restart" => SeedOnChange::Restart,
                "never" => SeedOnChange::Never,
                other => {
                    problem(
                        v.span(),
                        "cloud_init.on_change",
                        format!(
                            "unknown on_change '{}': use \"next-boot\", \"restart\" or \"never\"",
                            crate::desired::path_rule::shown(other, 40)
                        ),
                    );
                    ok = false;
                    SeedOnChange::default()
                }
            },
        };
        ok.then(|| CloudInitSpec {
            user_data: user_data.expect("checked above"),
            meta_data,
            network_config,
            on_change,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CloudInitSpec, Vec<(String, String)>> {
        let raw: RawCloudInit = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        CloudInitSpec::parse(&raw, 0..0, |_, field, msg| {
            problems.push((field.to_string(), msg))
        })
        .ok_or(problems)
    }

    #[test]
    fn defaults_and_values() {
        let spec = parse("user_data = \"ci/u.yaml.j2\"").unwrap();
        assert_eq!(spec.user_data, "ci/u.yaml.j2");
        assert_eq!(spec.on_change, SeedOnChange::NextBoot);
        assert_eq!(spec.meta_data, None);
        let spec =
            parse("user_data = \"u\"\nnetwork_config = \"n\"\non_change = \"never\"").unwrap();
        assert_eq!(spec.on_change, SeedOnChange::Never);
        assert_eq!(spec.network_config.as_deref(), Some("n"));
    }

    #[test]
    fn bad_values_name_the_field() {
        let problems = parse("meta_data = \"m\"").unwrap_err();
        assert_eq!(problems[0].0, "cloud_init.user_data");
        let problems = parse("user_data = \"../etc/shadow\"").unwrap_err();
        assert_eq!(problems[0].0, "cloud_init.user_data");
        let problems = parse("user_data = \"u\"\non_change = \"reboot\"").unwrap_err();
        assert_eq!(problems[0].0, "cloud_init.on_change");
        assert!(problems[0].1.contains("\"next-boot\""), "{}", problems[0].1);
    }
}
