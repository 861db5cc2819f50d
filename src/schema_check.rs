//! libvirt's schema checks of changed domain XML in a short-lived child process
//! (`vmsync schema-check`, hidden), while the sync goes on observing the host.
//!
//! Why a child: compiling libvirt's RELAX NG schema and opening the private test driver
//! cost a few MiB of heap and library pages for a few milliseconds. In the agent (above
//! all the daemon, which lives for months) that would raise its peak memory at every
//! commit that changes a file; in the child it is returned to the system when the child
//! exits. The child also keeps libxml2's and libvirt's parsers of repository input out of
//! the long-lived process. And it runs in parallel with the observation of the host,
//! which is read-only: its verdict is in before anything is planned or changed.
//!
//! Protocol: the parent writes a JSON array of XML texts to the child's stdin; the child
//! answers with a JSON array of the same length on stdout, `null` for an XML libvirt
//! accepts and the error message for one it rejects. Anything else (a crash, a short or
//! malformed answer) is an error of the sync, never a pass. Only a child that cannot be
//! started at all (no `/proc`) makes the sync check in its own process instead.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use crate::hypervisor::{SchemaChecker, TestDriverSchema};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "schema-check";

/// The checks themselves, in this process: `None` passed, `Some(message)` rejected.
pub fn check_here(schema: &TestDriverSchema, xmls: &[impl AsRef<str>]) -> Vec<Option<String>> {
    xmls.iter()
        .map(|xml| schema.check(xml.as_ref()).err())
        .collect()
}

/// The child's side: stdin → checks → stdout. Exit status 0 when it answered.
pub fn serve() -> u8 {
    let answer = (|| -> Result<Vec<Option<String>>, String> {
        // The schema is prepared first; the request waits in the pipe meanwhile.
        let schema = TestDriverSchema::new().map_err(|e| e.to_string())?;
        schema.prepare();
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .map_err(|e| format!("failed to read the XML to check: {e}"))?;
        let xmls: Vec<String> = serde_json::from_slice(&input)
            .map_err(|e| format!("malformed request from vmsync: {e}"))?;
        Ok(check_here(&schema, &xmls))
    })();
    let written = answer.and_then(|a| {
        let bytes = serde_json::to_vec(&a).map_err(|e| e.to_string())?;
        std::io::stdout()
            .write_all(&bytes)
            .map_err(|e| format!("failed to answer: {e}"))
    });
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmsync {SUBCOMMAND}: {e}");
            1
        }
    }
}

/// The executable a sync starts as its schema checker: this very program, through
/// `/proc/self/exe` (still the running binary after a package upgrade replaced the file).
pub const SELF_EXE: &str = "/proc/self/exe";

/// A child checking XML; killed and reaped if dropped before [`Running::wait`].
pub struct Running {
    child: Option<Child>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    count: usize,
}

/// Starts `exe schema-check`, to be given its XML with [`Running::send`].
fn start(exe: &Path) -> Result<Running, String> {
    let child = Command::new(exe)
        .arg(SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("failed to start '{} {SUBCOMMAND}': {e}", exe.display()))?;
    Ok(Running {
        child: Some(child),
        writer: None,
        count: 0,
    })
}

/// Starts `exe schema-check` on `xmls`.
pub fn spawn(exe: &Path, xmls: &[impl AsRef<str>]) -> Result<Running, String> {
    let request: Vec<&str> = xmls.iter().map(AsRef::as_ref).collect();
    let request = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    let mut running = start(exe)?;
    running.send(request, xmls.len());
    Ok(running)
}

impl Running {
    /// Hands the child its request, `count` XML texts as JSON (once).
    fn send(&mut self, request: Vec<u8>, count: usize) {
        let child = self.child.as_mut().expect("not waited yet");
        let mut stdin = child.stdin.take().expect("sent once");
        self.count = count;
        // On a thread: the child reads all of stdin before it answers, so this never
        // blocks on a full stdout pipe.
        self.writer = Some(std::thread::spawn(move || stdin.write_all(&request)));
    }

    /// The verdict per XML, in the order given: `None` passed, `Some(message)` rejected.
    pub fn wait(mut self) -> Result<Vec<Option<String>>, String> {
        let child = self.child.take().expect("waited once");
        let output = child
            .wait_with_output()
            .map_err(|e| format!("the schema checker failed: {e}"))?;
        let written = self
            .writer
            .take()
            .expect("sent before waiting")
            .join()
            .map_err(|_| "the schema checker's writer panicked".to_string())?;
        if !output.status.success() {
            return Err(format!("the schema checker failed ({})", output.status));
        }
        written.map_err(|e| format!("failed to send the XML to the schema checker: {e}"))?;
        let answer: Vec<Option<String>> = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("malformed answer from the schema checker: {e}"))?;
        if answer.len() != self.count {
            return Err(format!(
                "the schema checker answered {} of {} checks",
                answer.len(),
                self.count
            ));
        }
        Ok(answer)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Not waited for (the sync failed while observing): no orphan, no zombie.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in checker: a shell script given as the executable.
    fn script(dir: &Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("checker");
        crate::test_support::executable_script(&path, body);
        path
    }

    #[test]
    fn anything_but_a_full_answer_is_an_error_never_a_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let xmls = || vec!["<domain/>".to_string(), "<domain/>".to_string()];

        let missing = spawn(&tmp.path().join("nope"), &xmls()).err().unwrap();
        assert!(missing.contains("failed to start"), "{missing}");

        let crashed = script(tmp.path(), "cat >/dev/null; exit 3");
        let err = spawn(&crashed, &xmls()).unwrap().wait().unwrap_err();
        assert!(err.contains("failed"), "{err}");

        let short = script(tmp.path(), "cat >/dev/null; echo '[null]'");
        let err = spawn(&short, &xmls()).unwrap().wait().unwrap_err();
        assert!(err.contains("answered 1 of 2"), "{err}");

        let garbage = script(tmp.path(), "cat >/dev/null; echo ok");
        let err = spawn(&garbage, &xmls()).unwrap().wait().unwrap_err();
        assert!(err.contains("malformed answer"), "{err}");

        // The request arrives whole, and the answer is taken in order.
        let echo = script(
            tmp.path(),
            r#"[ "$1" = schema-check ] && [ "$(cat)" = '["<domain/>","<domain/>"]' ] && echo '[null,"no"]'"#,
        );
        let verdicts = spawn(&echo, &xmls()).unwrap().wait().unwrap();
        assert_eq!(verdicts, vec![None, Some("no".to_string())]);
    }

    #[test]
    fn a_child_not_waited_for_is_killed_and_reaped() {
        let tmp = tempfile::tempdir().unwrap();
        let slow = script(tmp.path(), "exec sleep 30");
        let running = spawn(&slow, &["<domain/>"]).unwrap();
        let pid = running.child.as_ref().unwrap().id();
        drop(running);
        // Reaped: no process (not even a zombie) with that id is left.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
