//! The floor for a no-op sync, measured with a bare libvirt client: one
//! `virConnectListAllDomains` plus one inactive-XML read per domain whose name starts
//! with PREFIX. Used by `bench/run.py`; prints the wall time in milliseconds.
//!
//! Usage: `floor URI PREFIX [ROUNDS [XML_FILE]]` (best of ROUNDS, default 5). With
//! XML_FILE it also times one validated define of that XML (as vmsync defines: with
//! `VIR_DOMAIN_DEFINE_VALIDATE`), best and median of ROUNDS, on a second line. PREFIX `-`
//! skips the list and the reads (the defines alone, for their CPU cost).

use std::time::Instant;

use virt::connect::Connect;
use virt::sys;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (uri, prefix) = (args.get(1).expect("URI"), args.get(2).expect("PREFIX"));
    let rounds: usize = args.get(3).map(|r| r.parse().expect("ROUNDS")).unwrap_or(5);
    let conn = Connect::open(Some(uri)).expect("connect");
    let mut best = f64::MAX;
    let mut count = 0;
    // PREFIX "-": no list and no reads, only the defines.
    for _ in 0..if prefix == "-" { 0 } else { rounds } {
        let started = Instant::now();
        let domains = conn.list_all_domains(0).expect("list");
        count = 0;
        for d in &domains {
            if d.name().expect("name").starts_with(prefix.as_str()) {
                let xml = d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE).expect("xml");
                assert!(!xml.is_empty());
                count += 1;
            }
        }
        best = best.min(started.elapsed().as_secs_f64() * 1000.0);
    }
    if prefix == "-" {
        println!("no list, no reads");
    } else {
        println!("{best:.1} ms for 1 list + {count} inactive xml reads");
    }
    if let Some(file) = args.get(4) {
        let xml = std::fs::read_to_string(file).expect("XML_FILE");
        let mut times: Vec<f64> = (0..rounds)
            .map(|_| {
                let started = Instant::now();
                conn.define_domain_xml_flags(&xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
                    .expect("define");
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{:.1} ms for 1 validated define (best), median {median:.1} ms",
            times[0]
        );
    }
}
