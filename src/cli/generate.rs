//! `vmsync __generate man|completions DIR`: the manual pages and shell completions, made
//! from the clap definitions of the binary itself when a package is built
//! (scripts/package.sh, the Nix package). Users never need it: it is not a clap command,
//! so neither `--help`, the man pages nor the completions show it.
//!
//! - `man`: vmsync.1 (every flag and command, plus EXIT STATUS, SIGNALS, ENVIRONMENT,
//!   FILES), one vmsync-COMMAND.1 per command, and vmsync.toml.5 (the VM repository
//!   format in short, pointing at the full reference installed with the docs).
//! - `completions`: vmsync.bash, _vmsync (zsh), vmsync.fish.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use super::Cli;

/// The first argument that selects this instead of the command line.
pub const COMMAND: &str = "__generate";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Man,
    Completions,
}

/// `vmsync __generate man DIR` or `vmsync __generate completions DIR` (`args`: what
/// follows `__generate`); anything else is a usage error, exit 2.
pub fn main(args: &[std::ffi::OsString]) -> u8 {
    let what = match args.first().and_then(|a| a.to_str()) {
        Some("man") => Some(What::Man),
        Some("completions") => Some(What::Completions),
        _ => None,
    };
    match (what, args) {
        (Some(what), [_, dir]) => run(what, Path::new(dir)),
        _ => {
            eprintln!("usage: vmsync {COMMAND} man|completions DIR");
            2
        }
    }
}

/// The exit statuses, as README.md and docs/operations.md list them.
pub const EXIT_STATUSES: &[(&str, &str)] = &[
    ("0", "Converged (also: nothing to do)."),
    (
        "1",
        "Some action failed (the other VMs were still applied), or libvirt was unreachable.",
    ),
    ("2", "Usage or agent configuration error."),
    (
        "3",
        "The commit is invalid, or would prune too many domains; nothing was applied, the last applied commit is kept.",
    ),
    ("4", "The repository could not be fetched."),
    (
        "5",
        "The commit is not trusted (unsigned or badly signed, or not a descendant of what was applied); nothing was applied.",
    ),
    (
        "75",
        "Another vmsync holds the lock in the state directory (logged at INFO: normal under a timer).",
    ),
    (
        "143, 130",
        "vmsync --once stopped by SIGTERM or SIGINT after the action in flight.",
    ),
];

/// Where the package puts the docs (README.md, docs/, example-repo/).
const DOC_DIR: &str = "/usr/share/doc/vmsync";

const DESCRIPTION: &str = "\
vmsync is a git-ops pull agent for libvirt hosts. A team keeps its VM definitions in a \
git repository (one libvirt domain XML per VM plus a vmsync.toml manifest, see \
vmsync.toml(5)); on each host vmsync fetches that repository, validates the whole \
commit, creates missing disk images, redefines the domains that changed, keeps each \
one in its declared power state, and records the last applied commit.

Without a command and without --once, vmsync runs as a daemon: it syncs at start, then \
on the [agent] schedule of its configuration. vmsync --once syncs once and exits with \
the sync's status (what vmsync.service does under vmsync.timer).

It never destroys a disk, never touches a domain it did not define (it tags the ones it \
defines), redefines domains in place so UEFI NVRAM and TPM state stay, and changes \
nothing when the commit is invalid or untrusted.";

/// Writes what `what` asks for into `dir` (created when missing) and names each file on
/// stdout.
pub fn run(what: What, dir: &Path) -> u8 {
    let written = std::fs::create_dir_all(dir).and_then(|()| match what {
        What::Man => man_pages(dir),
        What::Completions => completions(dir),
    });
    match written {
        Ok(files) => {
            for f in files {
                println!("{}", dir.join(f).display());
            }
            0
        }
        Err(e) => {
            eprintln!("error: cannot write to {}: {e}", dir.display());
            1
        }
    }
}

fn command() -> clap::Command {
    let mut cmd = Cli::command()
        .long_about(DESCRIPTION)
        .disable_help_subcommand(true);
    cmd.build();
    cmd
}

fn man_pages(dir: &Path) -> std::io::Result<Vec<String>> {
    let cmd = command();
    let mut files = vec![];
    let mut page = vec![];
    main_page(&cmd, &mut page)?;
    std::fs::write(dir.join("vmsync.1"), page)?;
    files.push("vmsync.1".to_owned());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = Man::new(sub.clone())
            .manual("vmsync")
            .source(format!("vmsync {}", env!("CARGO_PKG_VERSION")));
        let mut page = vec![];
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
        let mut roff = Roff::new();
        section(&mut roff, "EXIT STATUS");
        roff.text([
            roman("As for "),
            bold("vmsync"),
            roman("(1): 0 on success; see EXIT STATUS there."),
        ]);
        see_also(&mut roff, &["vmsync(1)", "vmsync.toml(5)"]);
        roff.to_writer(&mut page)?;
        let name = format!("{}.1", man.get_filename().trim_end_matches(".1"));
        std::fs::write(dir.join(&name), page)?;
        files.push(name);
    }
    std::fs::write(dir.join("vmsync.toml.5"), repository_page())?;
    files.push("vmsync.toml.5".to_owned());
    Ok(files)
}

fn section(roff: &mut Roff, name: &str) {
    roff.control("SH", [name]);
}

/// `.TP` paragraphs: a bold tag, then its text.
fn tagged(roff: &mut Roff, items: &[(&str, &str)]) {
    for (tag, text) in items {
        roff.control("TP", []);
        roff.text([bold(*tag)]);
        roff.text([roman(*text)]);
    }
}

fn see_also(roff: &mut Roff, pages: &[&str]) {
    section(roff, "SEE ALSO");
    let mut parts = vec![];
    for (i, page) in pages.iter().enumerate() {
        let (name, rest) = page.split_once('(').unwrap_or((page, ""));
        if i > 0 {
            parts.push(roman(", "));
        }
        parts.push(bold(name));
        parts.push(roman(format!("({rest}")));
    }
    roff.text(parts);
}

fn main_page(cmd: &clap::Command, page: &mut Vec<u8>) -> std::io::Result<()> {
    let man = Man::new(cmd.clone()).manual("vmsync");
    man.render_title(page)?;
    man.render_name_section(page)?;
    man.render_synopsis_section(page)?;
    man.render_description_section(page)?;
    man.render_options_section(page)?;
    man.render_subcommands_section(page)?;

    let mut roff = Roff::new();
    section(&mut roff, "EXIT STATUS");
    tagged(&mut roff, EXIT_STATUSES);
    section(&mut roff, "SIGNALS");
    tagged(
        &mut roff,
        &[
            (
                "SIGHUP",
                "The daemon re-reads its configuration file and syncs now (systemctl reload vmsync-agent).",
            ),
            (
                "SIGTERM, SIGINT",
                "The action in flight finishes, the rest is recorded as interrupted, and vmsync exits: the daemon with 0, vmsync --once with 143 or 130. A second signal exits at once.",
            ),
        ],
    );
    section(&mut roff, "ENVIRONMENT");
    tagged(
        &mut roff,
        &[
            (
                "VMSYNC_LOG",
                "Log filter: a level (debug) or comma-separated target=level directives; unset or unparsable: info.",
            ),
            ("NO_COLOR", "When set and not empty: no colour in the log."),
        ],
    );
    section(&mut roff, "FILES");
    let doc = format!("{DOC_DIR}/");
    tagged(
        &mut roff,
        &[
            (
                "/etc/vmsync/config.toml",
                "The agent's configuration (--config PATH for another); every key is described in the file itself.",
            ),
            (
                "/var/lib/vmsync",
                "State directory: the clone, state.json (the last applied commit and each VM), the lock, .ssh/known_hosts.",
            ),
            (
                "vmsync.service, vmsync.timer, vmsync-agent.service",
                "systemd units: vmsync --once every 5 minutes (enable vmsync.timer), or the daemon (enable vmsync-agent.service). Installed, not enabled.",
            ),
            (
                &doc,
                "README.md, docs/ (configuration, operations, repository format, webhook, health checks), SECURITY.md and example-repo/, a VM repository to start from.",
            ),
        ],
    );
    section(&mut roff, "VERSION");
    roff.text([roman(super::LONG_VERSION.replace('\n', "; "))]);
    let mut pages: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| format!("vmsync-{}(1)", s.get_name()))
        .collect();
    pages.extend(["vmsync.toml(5)", "virsh(1)", "systemd.timer(5)"].map(String::from));
    see_also(
        &mut roff,
        &pages.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    roff.to_writer(page)
}

/// vmsync.toml(5): the repository format in short; the reference is a document.
fn repository_page() -> String {
    let mut roff = Roff::new();
    roff.control(
        "TH",
        [
            "VMSYNC.TOML",
            "5",
            "",
            &format!("vmsync {}", env!("CARGO_PKG_VERSION")),
            "vmsync",
        ],
    );
    section(&mut roff, "NAME");
    roff.text([roman("vmsync.toml - the VM repository that vmsync applies")]);
    section(&mut roff, "DESCRIPTION");
    roff.text([roman(
        "A VM repository is a git repository with a vmsync.toml manifest at its top and one \
         libvirt domain XML per VM. The manifest lists the VMs ([[vm]]: name, xml, \
         autostart, state, on_change, hosts, adopt, and [[vm.disk]] images created once \
         when missing), the directories to create ([[directory]]), and libvirt networks \
         and storage pools ([[network]], [[pool]]). Instead of xml, a VM may name a \
         template (Jinja) that many VMs share, rendered with vm.name, host and its \
         [vm.params] over the repository's [params]; vmsync render DIR VM prints the \
         result. Every commit is validated as a whole before a host is touched; vmsync \
         validate DIR does the same check offline.",
    )]);
    section(&mut roff, "EXAMPLE");
    roff.control("nf", []);
    roff.text([roman(
        "version = 1\n\n[[vm]]\nname = \"web\"\nxml = \"vms/web.xml\"\nautostart = true\n\n  [[vm.disk]]\n  path = \"/var/lib/libvirt/images/web.qcow2\"\n  size = \"20G\"",
    )]);
    roff.control("fi", []);
    section(&mut roff, "FULL REFERENCE");
    roff.text([
        roman("Every key, the XML rules, the host policy and what validation refuses: "),
        italic(format!("{DOC_DIR}/docs/repository-format.md")),
        roman(". A complete repository to start from (a UEFI + Secure Boot + TPM VM, a BIOS VM, two VMs from one template, a network and a pool): "),
        italic(format!("{DOC_DIR}/example-repo/")),
        roman("."),
    ]);
    see_also(&mut roff, &["vmsync(1)", "vmsync-validate(1)"]);
    roff.to_roff()
}

fn completions(dir: &Path) -> std::io::Result<Vec<String>> {
    use clap_complete::Shell;
    let mut files = vec![];
    for (shell, name) in [
        (Shell::Bash, "vmsync.bash"),
        (Shell::Zsh, "_vmsync"),
        (Shell::Fish, "vmsync.fish"),
    ] {
        let mut out = vec![];
        clap_complete::generate(shell, &mut Cli::command(), "vmsync", &mut out);
        std::fs::File::create(dir.join(name))?.write_all(&out)?;
        files.push(name.to_owned());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_rows(doc: &str) -> Vec<String> {
        doc.lines()
            .filter_map(|l| l.strip_prefix("| "))
            .filter_map(|l| l.split_once(" |"))
            .map(|(status, _)| status.trim().to_owned())
            .filter(|s| s.starts_with(|c: char| c.is_ascii_digit()))
            .collect()
    }

    #[test]
    fn man_page_lists_every_exit_status_of_the_readme() {
        let readme = exit_rows(include_str!("../../README.md"));
        let listed: Vec<&str> = EXIT_STATUSES.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            readme, listed,
            "README.md's exit status table vs EXIT_STATUSES"
        );
    }

    #[test]
    fn man_pages_cover_every_command_flag_and_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(run(What::Man, dir.path()), 0);
        let main = std::fs::read_to_string(dir.path().join("vmsync.1")).unwrap();
        for arg in command().get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                // roff escapes the dashes: \-\-once
                let flag = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(main.contains(&flag), "vmsync.1 lacks {flag}");
            }
        }
        for (status, _) in EXIT_STATUSES {
            assert!(
                main.contains(&format!("\\fB{status}\\fR")),
                "status {status}"
            );
        }
        assert!(main.contains(".SH \"EXIT STATUS\""), "{main}");
        for sub in command().get_subcommands().map(|s| s.get_name().to_owned()) {
            assert!(
                main.contains(&format!("\\fBvmsync\\-{sub}\\fR(1)")),
                "vmsync.1 does not point at vmsync-{sub}(1)"
            );
            let page = std::fs::read_to_string(dir.path().join(format!("vmsync-{sub}.1")))
                .unwrap_or_else(|e| panic!("vmsync-{sub}.1: {e}"));
            assert!(page.contains(&format!(".TH vmsync-{sub} 1")), "{page}");
        }
        assert!(!main.contains(COMMAND));
        assert!(!dir.path().join("vmsync-help.1").exists());
        let repo = std::fs::read_to_string(dir.path().join("vmsync.toml.5")).unwrap();
        assert!(repo.contains("/usr/share/doc/vmsync/docs/repository\\-format.md"));
    }

    #[test]
    fn anything_but_man_or_completions_and_a_dir_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().as_os_str().to_owned();
        for args in [vec![], vec!["man".into()], vec!["html".into(), d.clone()]] {
            assert_eq!(main(&args), 2, "{args:?}");
        }
        assert_eq!(main(&["man".into(), d.clone(), "more".into()]), 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(main(&["completions".into(), d]), 0);
    }

    #[test]
    fn version_names_the_commit_and_libvirt() {
        let lines: Vec<&str> = super::super::LONG_VERSION.lines().collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0], env!("CARGO_PKG_VERSION"));
        let commit = lines[1].strip_prefix("commit ").unwrap();
        assert!(
            commit == "unknown"
                || commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{commit}"
        );
        assert!(
            lines[2].starts_with("built against libvirt "),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn completions_name_the_commands_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(run(What::Completions, dir.path()), 0);
        for file in ["vmsync.bash", "_vmsync", "vmsync.fish"] {
            let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
            for word in ["validate", "import", "allow-rewind", "disk-root"] {
                assert!(text.contains(word), "{file} lacks {word}");
            }
            assert!(
                !text.contains("__generate"),
                "{file} offers the hidden command"
            );
        }
    }
}
