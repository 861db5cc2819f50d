//! Where the desired state comes from: the git fetch that pins one commit, the files of
//! that commit (or of a checkout, for `vmsync validate`), and the trust checks of the
//! commit (signature, ancestry).

pub mod files;
pub mod https;
pub mod probe;
pub mod source;
pub mod trust;
