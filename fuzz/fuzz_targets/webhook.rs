//! Fuzzes the webhook's decision (`agent::webhook::verify`): any headers and body give a
//! decision without a panic; nothing unsigned gets past authentication; a body signed
//! with the secret always does, and only a push of `refs/heads/main` syncs.
//!
//! Input: one mode byte, then header lines (`name: value`), a blank line, the body.
//! Mode bit 0 set: the headers are taken as they are (the signature is the fuzzer's).
//! Clear: the body is signed with the secret, as GitHub would, and the fuzzer's
//! headers are kept except signatures and tokens.
#![no_main]

use hmac::{KeyInit, Mac};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

use vmsync::agent::webhook::{Decision, Secret, verify};

const AUTH_HEADERS: [&str; 4] = [
    "x-hub-signature-256",
    "x-gitea-signature",
    "x-forgejo-signature",
    "x-gitlab-token",
];

fn headers(head: &[u8], keep_auth: bool) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        if keep_auth || !AUTH_HEADERS.contains(&name.as_str()) {
            map.append(name, value);
        }
    }
    map
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let split = rest.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (&rest[..at], &rest[at + 2..]),
        None => (rest, &[][..]),
    };
    let secret = Secret::new(&b"s3cret"[..]);
    let other = Secret::new(&b"s3cret!"[..]);
    if mode & 1 == 1 {
        let map = headers(head, true);
        let decision = verify(&map, body, &secret, "main");
        // No input is accepted under two different secrets (that would need a MAC
        // collision): authentication depends on the secret.
        if !matches!(decision, Decision::Unauthorized(_)) {
            assert!(matches!(
                verify(&map, body, &other, "main"),
                Decision::Unauthorized(_)
            ));
        }
        // Without any signature or token header, nothing gets through.
        if !AUTH_HEADERS.iter().any(|h| map.contains_key(*h)) {
            assert!(matches!(decision, Decision::Unauthorized(_)));
        }
    } else {
        let mut map = headers(head, false);
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        map.insert("x-hub-signature-256", HeaderValue::from_str(&sig).unwrap());
        let decision = verify(&map, body, &secret, "main");
        assert!(!matches!(decision, Decision::Unauthorized(_)), "{decision:?}");
        if decision == Decision::Sync {
            let v: serde_json::Value = serde_json::from_slice(body).expect("a sync needs JSON");
            assert_eq!(v["ref"], "refs/heads/main");
        }
    }
});
