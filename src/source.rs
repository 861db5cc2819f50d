//! Fetching the VM repository with git2 (placeholder, being written).
