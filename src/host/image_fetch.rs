//! Downloading a base image (`[[image]]`) in one streaming pass: the served bytes are
//! hashed (sha256) on a reader thread while a writer thread decompresses them (`.gz`
//! through flate2, `.xz` through liblzma) and writes them to the file it is handed. No
//! byte is read twice. `host::image_store` owns the file (temporary name, rename).
//!
//! HTTP is ureq with native-tls, the TLS setup of the git transport
//! (`repo::https::tls_config`; the CA bundle is read on the first `https://` connection
//! only). Redirects are followed by hand (at most [`MAX_REDIRECTS`]) so that every target
//! is checked against `[policy] image_urls` and the link-local rule like the URL itself.
//! No proxy. A read that receives nothing for `[policy] image_timeout` fails; so does a
//! connection that cannot be made in that time. Progress is logged every
//! [`PROGRESS_EVERY`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::info;

use crate::desired::disk_spec::{Compression, ImageSpec};
use crate::desired::host_policy_settings::ImagePolicy;
use crate::desired::image_spec;

/// Redirects followed, each checked against the policy.
pub const MAX_REDIRECTS: usize = 5;

/// How often a running download logs its progress.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Size of one chunk handed from the reader thread to the writer thread.
const CHUNK: usize = 1 << 20;

/// Chunks in flight between the threads.
const IN_FLIGHT: usize = 4;

/// What one download needs: the image, and the policy its redirects obey.
pub struct Download<'a> {
    pub image: &'a ImageSpec,
    pub policy: &'a ImagePolicy,
    pub allow_link_local: bool,
}

/// What a finished download received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// sha256 of the bytes served, lowercase hex.
    pub sha256: String,
    /// Bytes served (before decompression).
    pub served: u64,
    /// Bytes written (after decompression).
    pub written: u64,
}

/// Downloads `d.image` into `out` (from its start). `Err` says what failed, naming the
/// image and its URL; `out` then holds some part of it, which the caller discards.
pub fn download(d: &Download, out: &mut File) -> Result<Received, String> {
    let image = d.image;
    let fail = |what: String| format!("image '{}' from '{}': {what}", image.name, image.url);
    let (body, length) = open(d).map_err(fail)?;
    info!(image = %image.name, url = %image.url, bytes = ?length, "downloading image");
    let started = Instant::now();
    let received = pipe(body, out, length, d).map_err(fail)?;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    info!(
        image = %image.name,
        served = received.served,
        written = received.written,
        seconds = format!("{secs:.3}"),
        mib_per_s = format!("{:.1}", received.served as f64 / secs / (1 << 20) as f64),
        "image downloaded"
    );
    Ok(received)
}

/// The agent of one download: timeouts from the policy, no automatic redirect.
fn agent(timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .user_agent(concat!("vmsync/", env!("CARGO_PKG_VERSION")))
        .timeout_resolve(Some(timeout))
        .timeout_connect(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_per_read(Some(timeout))
        .timeout_per_write(Some(timeout))
        .tls_config(crate::repo::https::tls_config())
        .build();
    ureq::Agent::new_with_config(config)
}

/// Sends the GET, following checked redirects; returns the body and its length when
/// the server says it.
fn open(d: &Download) -> Result<(ureq::BodyReader<'static>, Option<u64>), String> {
    let agent = agent(d.policy.timeout);
    let mut url = d.image.url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let response = agent
            .get(&url)
            .call()
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("the server answered {status} without a Location"))?;
            let next = image_spec::resolve_location(&url, location)
                .ok_or_else(|| format!("cannot follow the redirect to '{location}'"))?;
            image_spec::check_allowed(&next, d.policy, d.allow_link_local)
                .map_err(|e| format!("redirect refused: {e}"))?;
            url = next;
            continue;
        }
        if !status.is_success() {
            return Err(format!("the server answered {status}"));
        }
        let body = response.into_body();
        let length = body.content_length();
        return Ok((body.into_reader(), length));
    }
    Err(format!("more than {MAX_REDIRECTS} redirects"))
}

/// A chunk from the reader thread (a buffer of [`CHUNK`] bytes and how many of them
/// hold data), or why it stopped.
type Chunk = Result<(Vec<u8>, usize), String>;

/// The reader's chunks as a `Read` for the writer thread (and its decompressor).
struct Chunks {
    rx: mpsc::Receiver<Chunk>,
    /// Emptied buffers go back to the reader.
    back: mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    /// Bytes of `current` that hold data.
    len: usize,
    pos: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            match self.rx.recv() {
                Ok(Ok((chunk, len))) => {
                    let done = std::mem::replace(&mut self.current, chunk);
                    if !done.is_empty() {
                        let _ = self.back.try_send(done);
                    }
                    (self.len, self.pos) = (len, 0);
                }
                Ok(Err(e)) => return Err(io::Error::other(e)),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads `body` to its end on this thread, hashing every byte and handing the chunks on.
fn read_and_hash(
    mut body: impl Read,
    tx: mpsc::SyncSender<Chunk>,
    back: mpsc::Receiver<Vec<u8>>,
    timeout: Duration,
) -> (String, u64) {
    let mut hasher = Sha256::new();
    let mut served = 0u64;
    loop {
        // A buffer back from the writer, else a new one (zeroed by the allocator).
        let mut buf = back.try_recv().unwrap_or_else(|_| vec![0; CHUNK]);
        let mut filled = 0;
        let result = loop {
            match body.read(&mut buf[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled >= CHUNK / 2 {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        hasher.update(&buf[..filled]);
        served += filled as u64;
        let end = filled == 0;
        let go_on = match result {
            Err(e) => {
                let _ = tx.send(Err(describe_io(&e, timeout)));
                false
            }
            Ok(()) if end => false,
            Ok(()) => tx.send(Ok((buf, filled))).is_ok(),
        };
        if !go_on {
            return (hex::encode(hasher.finalize()), served);
        }
    }
}

/// A read error as a message (a timeout says so, with the limit).
fn describe_io(e: &io::Error, timeout: Duration) -> String {
    let ureq_timeout = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
        .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
    if ureq_timeout
        || matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        )
    {
        format!(
            "the server sent nothing within the timeout of {} ([policy] image_timeout)",
            humantime::format_duration(timeout)
        )
    } else {
        format!("the download was cut: {e}")
    }
}

/// Copies `from` (decompressing) into `out`, logging progress.
fn write_out(
    from: Chunks,
    compression: Compression,
    out: &mut File,
    length: Option<u64>,
    image: &ImageSpec,
) -> io::Result<u64> {
    let mut reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(from),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(from)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(from)),
    };
    let mut buf = vec![0u8; CHUNK];
    let (mut written, mut last) = (0u64, Instant::now());
    let started = last;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        written += n as u64;
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            info!(
                image = %image.name,
                written,
                served_total = ?length,
                mib_per_s = format!("{:.1}", written as f64 / secs / (1 << 20) as f64),
                "downloading image"
            );
        }
    }
    // Whatever follows the compressed stream is served bytes too: hashed, not written.
    io::copy(&mut reader, &mut io::sink())?;
    Ok(written)
}

/// The two threads of one download.
fn pipe(
    body: ureq::BodyReader<'static>,
    out: &mut File,
    length: Option<u64>,
    d: &Download,
) -> Result<Received, String> {
    let (image, timeout) = (d.image, d.policy.timeout);
    let (tx, rx) = mpsc::sync_channel::<Chunk>(IN_FLIGHT);
    let (back_tx, back_rx) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 2);
    std::thread::scope(|s| {
        let reader = s.spawn(move || read_and_hash(body, tx, back_rx, timeout));
        let chunks = Chunks {
            rx,
            back: back_tx,
            current: Vec::new(),
            len: 0,
            pos: 0,
        };
        let written = write_out(chunks, image.compression, out, length, image);
        let (sha256, served) = reader.join().map_err(|_| "the reader thread panicked")?;
        let written = written.map_err(|e| match e.get_ref() {
            Some(inner) if e.kind() == io::ErrorKind::Other => inner.to_string(),
            _ => format!("{e}"),
        })?;
        if let Some(length) = length
            && length != served
        {
            return Err(format!(
                "the download was cut: {served} of {length} bytes received"
            ));
        }
        Ok(Received {
            sha256,
            served,
            written,
        })
    })
}
