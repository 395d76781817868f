//! How the proxy binary is linked.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Relative relocations packed (DT_RELR; glibc 2.36 and binutils 2.38 or later, as in
        // Debian 12, the image's base): the 420 KB table the loader reads at every start
        // becomes a few kilobytes, so less of the binary is resident. It stays
        // position-independent, so ASLR still applies.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
