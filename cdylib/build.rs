//! Build script: link libp11shim.so with `-z nodelete`.
//!
//! A PKCS#11 module is loaded and unloaded by its host at will (dlclose
//! after C_Finalize). p11shim stops its threads at C_Finalize, but Rust's
//! runtime and the diagnostic logger keep process-wide state (thread-local
//! destructors, a global log dispatcher) that must not be unmapped while the
//! process lives, nor be set up again, leaking, at every reload. With
//! `nodelete` the first load stays mapped: dlclose succeeds, a later dlopen
//! finds the same copy, and memory stays flat however often the host
//! reloads the module.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
