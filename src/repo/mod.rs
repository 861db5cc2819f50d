//! Where the desired state comes from (layer 2): the git fetch that pins one commit, the
//! change probe, and the trust checks of the commit (signature, ancestry); a damaged
//! local clone is moved aside and cloned again (`source::clone_repair`); and the files of that
//! commit (or of a checkout, for `vmsync validate`) through the `RepoFiles` port
//! (`files`, layer 0).

pub mod files;
pub mod https;
pub mod pkt_line;
pub mod probe;
pub mod source;
pub mod trust;
