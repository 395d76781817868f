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
    // On this target rustc links with its own LLD (since Rust 1.90), which can place
    // functions in a given order. link-order.txt lists the functions a start and a few
    // requests run, most used first (scripts/link-order writes it): laid out together, they
    // fill fewer pages, so less of the binary is resident and the hot path shares cache
    // lines and TLB entries. A name it lists that the binary lacks is skipped, so a stale
    // list costs only its benefit.
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu") {
        let order = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("link-order.txt");
        println!("cargo:rerun-if-changed={}", order.display());
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
