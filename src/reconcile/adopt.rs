//! `adopt = true` in the planner: whether an untagged domain may be taken over, and
//! how. Pure; `reconcile::plan` calls it for a desired VM with `adopt` whose domain has
//! no vmsync tag (without `adopt`, such a domain fails the VM and is never touched).
//!
//! - A commit XML with a `<uuid>` other than the domain's: not adopted (an error for that
//!   VM): it names another machine.
//! - The rendered XML (the commit's, with the domain's UUID and MACs filled in) is the
//!   domain's definition as `vmsync import` writes it ([`definition::same_definition`]):
//!   only the tag is added, without a redefine, so libvirt sends no lifecycle event.
//! - Otherwise it is redefined in place: same UUID, NVRAM and TPM state (a redefine keeps
//!   them; vmsync never undefines to adopt).

use crate::desired::desired_state::DesiredVm;
use crate::desired::domain_xml::Tag;
use crate::host::observe_domains::SeenDomain;
use crate::onboard::definition;
use crate::reconcile::plan_types::Action;

/// Why an untagged domain cannot be adopted by `vm`: its UUID is not the commit's.
pub fn uuid_conflict(vm: &DesiredVm, seen: &SeenDomain) -> Option<String> {
    let untagged = seen.inactive.as_ref().is_some_and(|s| s.tag.is_none());
    let uuid = vm.summary.uuid.as_deref()?;
    (untagged && !uuid.eq_ignore_ascii_case(&seen.listing.uuid)).then(|| {
        format!(
            "domain '{}' has uuid {}, but the commit's xml says {uuid}; not adopted (it is another machine: correct the <uuid>, or give the vm another name)",
            seen.listing.name, seen.listing.uuid
        )
    })
}

/// The adopt action for the untagged domain `seen`, given the XML vmsync would define.
pub fn action(seen: Option<&SeenDomain>, tag: Tag, rendered: String) -> Action {
    let unchanged = seen
        .and_then(|s| s.inactive_xml.as_deref())
        .is_some_and(|host| definition::same_definition(host, &rendered));
    Action::Adopt {
        tag,
        xml: (!unchanged).then_some(rendered),
        live: unchanged && seen.is_some_and(|s| s.listing.active),
    }
}
