//! Commit ids as messages show them.

/// The first 12 characters of a commit id, for messages (whatever the record holds).
pub fn short(commit: &str) -> &str {
    commit
        .char_indices()
        .nth(12)
        .map_or(commit, |(at, _)| &commit[..at])
}
