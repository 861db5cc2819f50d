//! Disk provisioning with `qemu-img` (placeholder, being written).
