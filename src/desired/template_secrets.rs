//! `secret("secrets/x.age")` in cloud-init templates: the function the template
//! environment calls, and the table of the secrets a render asked for.
//!
//! A template function cannot read the commit itself (it lives as long as the
//! environment), so it works like the template loader: the first render notes the
//! secrets it asked for, the renderer reads and decrypts them (`load`), and the template
//! is rendered again. A domain definition template gets a `secret()` that refuses: libvirt
//! keeps domain XML readable to every libvirt client, so a secret has no place there.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

use crate::desired::secret_port::{Opened, Secrets};
use crate::repo::files::RepoFiles;

/// One secret a render asked for.
#[derive(Clone)]
enum State {
    Requested,
    Plain(String),
    /// Offline validation: the format is checked, the value is a placeholder.
    FormatOnly,
    Failed(String),
}

/// The secrets of one renderer, and whether the current render used any.
#[derive(Default)]
pub struct SecretTable {
    state: BTreeMap<String, State>,
    used: bool,
}

/// The table of a text renderer.
pub type Table = Arc<Mutex<SecretTable>>;

fn lock(table: &Table) -> std::sync::MutexGuard<'_, SecretTable> {
    table.lock().expect("the secret table is not poisoned")
}

/// What a secret reads as when this run checks the format only.
pub const PLACEHOLDER: &str = "(secret: not decrypted by vmsync validate)";

/// Adds `secret()` to a cloud-init template environment, reading from `table`.
pub fn add_function(env: &mut Environment<'static>, table: &Table) {
    let table = Arc::clone(table);
    env.add_function("secret", move |path: String| -> Result<Value, Error> {
        let mut t = lock(&table);
        t.used = true;
        match t.state.get(&path) {
            Some(State::Plain(text)) => Ok(Value::from(text.clone())),
            Some(State::FormatOnly) => Ok(Value::from(PLACEHOLDER)),
            Some(State::Failed(why)) => Err(Error::new(ErrorKind::InvalidOperation, why.clone())),
            Some(State::Requested) => Ok(Value::from("")),
            None => {
                t.state.insert(path, State::Requested);
                Ok(Value::from(""))
            }
        }
    });
}

/// Adds the `secret()` of a domain definition template: always an error.
pub fn add_refusal(env: &mut Environment<'static>) {
    env.add_function("secret", |path: String| -> Result<Value, Error> {
        Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "secret(\"{}\") is for cloud-init files only: libvirt shows a domain definition to every libvirt client, so it must hold no secret",
                crate::desired::path_rule::escape(&path)
            ),
        ))
    });
}

/// Reads and decrypts the secrets renders asked for; how many there were.
pub fn load(table: &Table, files: &dyn RepoFiles, secrets: &Secrets) -> usize {
    let requested: Vec<String> = lock(table)
        .state
        .iter()
        .filter(|(_, s)| matches!(s, State::Requested))
        .map(|(p, _)| p.clone())
        .collect();
    for path in &requested {
        let state = match files.read_bytes(path) {
            Err(e) => State::Failed(format!("secret(\"{path}\"): {e}")),
            Ok(bytes) => match secrets.open(path, &bytes) {
                Ok(Opened::FormatOnly) => State::FormatOnly,
                Ok(Opened::Plain(plain)) => match String::from_utf8(plain.0) {
                    Ok(text) => State::Plain(text),
                    Err(_) => State::Failed(format!("secret '{path}' is not UTF-8 text")),
                },
                Err(why) => State::Failed(why),
            },
        };
        lock(table).state.insert(path.clone(), state);
    }
    requested.len()
}

/// Every secret the renders of this table asked for.
pub fn paths(table: &Table) -> Vec<String> {
    lock(table).state.keys().cloned().collect()
}

/// Starts a render: no secret used yet.
pub fn start(table: &Table) {
    lock(table).used = false;
}

/// Whether the render since [`start`] used a secret.
pub fn used(table: &Table) -> bool {
    lock(table).used
}
