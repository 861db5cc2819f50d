//! glibc malloc settings for a small agent that runs a few short-lived worker threads.
//!
//! By default glibc gives every thread that allocates its own arena; the observation and
//! apply threads would each keep one with freed memory that no other thread reuses. One
//! arena is enough for vmsync (the threads mostly wait on libvirt), and a daemon hands
//! what a sync freed back to the kernel before it sleeps. Elsewhere these do nothing.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::ffi::c_int;

    /// `M_ARENA_MAX`, `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` from glibc's `<malloc.h>`.
    pub const M_ARENA_MAX: c_int = -8;
    pub const M_MMAP_THRESHOLD: c_int = -3;
    pub const M_TRIM_THRESHOLD: c_int = -1;

    unsafe extern "C" {
        pub fn mallopt(param: c_int, value: c_int) -> c_int;
        pub fn malloc_trim(pad: usize) -> c_int;
    }
}

/// One malloc arena for the whole process, and fixed 128 KiB thresholds for mmap and
/// trimming, unless the `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` or
/// `MALLOC_TRIM_THRESHOLD_` environment variables say otherwise. glibc's default
/// thresholds grow after a large buffer is freed, so that later large buffers (a file,
/// `state.json` as text) stay in the heap and add to the peak; fixed, they are mapped
/// for their lifetime only. Call first thing in `main`, before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, param, value) in [
        ("MALLOC_ARENA_MAX", glibc::M_ARENA_MAX, 1),
        ("MALLOC_MMAP_THRESHOLD_", glibc::M_MMAP_THRESHOLD, 128 << 10),
        ("MALLOC_TRIM_THRESHOLD_", glibc::M_TRIM_THRESHOLD, 128 << 10),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only sets a malloc parameter; no thread allocates yet.
            unsafe {
                glibc::mallopt(param, value);
            }
        }
    }
}

/// Returns freed heap pages to the kernel (after a sync, before the daemon sleeps).
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        glibc::malloc_trim(0);
    }
}
