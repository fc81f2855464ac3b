//! `p11shim slots [--module PATH] [--json]`: loads `libp11shim.so` as any
//! application does, initializes it, and reads every virtual slot and
//! member through p11shim's own interface (`C_GetInterface("p11shim")`,
//! `P11shim_GetStatus`, see `include/p11shim.h`).

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use pkcs11_sys::{
    CK_C_INITIALIZE_ARGS, CK_FLAGS, CK_INTERFACE, CK_RV, CK_ULONG, CK_UTF8CHAR_PTR, CK_VERSION,
    CKF_OS_LOCKING_OK, CKR_BUFFER_TOO_SMALL, CKR_OK,
};
use serde_json::Value;

use super::CliError;
use crate::output::{Style, print_json};

/// Environment variable naming the module to load.
pub const MODULE_ENV: &str = "P11SHIM_MODULE";
/// Where an installed module is looked for after `<bin>/../lib`.
const SYSTEM_PATHS: [&str; 2] = ["/usr/local/lib/libp11shim.so", "/usr/lib/libp11shim.so"];
/// `CKR_VENDOR_DEFINED | 0x50530001`: the configuration is invalid.
const CKR_P11SHIM_CONFIG_INVALID: CK_RV = 0x8000_0000 | 0x5053_0001;
/// `CKR_VENDOR_DEFINED | 0x50530002`: a vendor library did not load.
const CKR_P11SHIM_BACKEND_UNAVAILABLE: CK_RV = 0x8000_0000 | 0x5053_0002;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The p11shim module (default: $P11SHIM_MODULE, else <bin>/../lib,
    /// /usr/local/lib, /usr/lib).
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// Print the status document as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `P11SHIM_FUNCTION_LIST` of `include/p11shim.h`, version 1.0.
#[repr(C)]
struct P11shimFunctionList {
    version: CK_VERSION,
    get_status: Option<unsafe extern "C" fn(CK_UTF8CHAR_PTR, *mut CK_ULONG) -> CK_RV>,
}

type Initialize = unsafe extern "C" fn(*mut c_void) -> CK_RV;
type Finalize = unsafe extern "C" fn(*mut c_void) -> CK_RV;
type GetInterface = unsafe extern "C" fn(
    CK_UTF8CHAR_PTR,
    *mut CK_VERSION,
    *mut *mut CK_INTERFACE,
    CK_FLAGS,
) -> CK_RV;

/// The module to load: explicit, else the environment, else installed.
pub fn module_path(explicit: Option<&Path>) -> Result<PathBuf, CliError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(MODULE_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("lib/libp11shim.so")));
    beside
        .into_iter()
        .chain(SYSTEM_PATHS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CliError::Module(format!(
                "no p11shim module found (<bin>/../lib, {}); pass --module or set {MODULE_ENV}",
                SYSTEM_PATHS.join(", ")
            ))
        })
}

fn rv_text(rv: CK_RV) -> String {
    match rv {
        CKR_P11SHIM_CONFIG_INVALID => {
            "CKR_P11SHIM_CONFIG_INVALID: the configuration is invalid (run `p11shim config check`)"
                .into()
        }
        CKR_P11SHIM_BACKEND_UNAVAILABLE => {
            "CKR_P11SHIM_BACKEND_UNAVAILABLE: a member's vendor library could not be loaded or initialized (see the module's log)".into()
        }
        rv => format!("CK_RV 0x{rv:08X}"),
    }
}

/// Loads the module, initializes it, reads its status and finalizes it.
pub fn read_status(path: &Path) -> Result<Value, CliError> {
    let fail = |what: &str, rv: CK_RV| {
        CliError::Module(format!("{}: {what}: {}", path.display(), rv_text(rv)))
    };
    // SAFETY: loading a PKCS#11 module runs its initializers; the operator
    // chose this file as the module applications load. RTLD_NOW|LOCAL as
    // p11-kit does, so that a missing symbol fails here, not in a call.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .map_err(|e| CliError::Module(format!("cannot load {}: {e}", path.display())))?;
    let symbol = |name: &[u8]| -> Result<*mut c_void, CliError> {
        // SAFETY: the symbol is only read as an address here; it is cast
        // to its PKCS#11 signature below.
        unsafe { lib.get::<*mut c_void>(name) }
            .map(|s| *s)
            .map_err(|_| {
                CliError::Module(format!(
                    "{}: no {} symbol: not a PKCS#11 3.0 module",
                    path.display(),
                    String::from_utf8_lossy(&name[..name.len() - 1])
                ))
            })
    };
    let init_ptr = symbol(b"C_Initialize\0")?;
    let fin_ptr = symbol(b"C_Finalize\0")?;
    let iface_ptr = symbol(b"C_GetInterface\0")?;
    // SAFETY: the exported C_* functions have the PKCS#11 signatures
    // (PKCS#11 3.0, 5.4 and 5.2).
    let (initialize, finalize, get_interface) = unsafe {
        (
            std::mem::transmute::<*mut c_void, Initialize>(init_ptr),
            std::mem::transmute::<*mut c_void, Finalize>(fin_ptr),
            std::mem::transmute::<*mut c_void, GetInterface>(iface_ptr),
        )
    };
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: std::ptr::null_mut(),
    };
    // SAFETY: `args` is a valid CK_C_INITIALIZE_ARGS that outlives the call.
    let rv = unsafe { initialize((&raw mut args).cast()) };
    if rv != CKR_OK {
        return Err(fail("C_Initialize", rv));
    }
    // SAFETY: the module is initialized; `status` only calls into it.
    let result = unsafe { status(get_interface) }.map_err(|(what, rv)| fail(what, rv));
    // SAFETY: C_Finalize with NULL, as the spec requires; nothing else of
    // the module is in use.
    let rv = unsafe { finalize(std::ptr::null_mut()) };
    let json = result?;
    if rv != CKR_OK {
        return Err(fail("C_Finalize", rv));
    }
    serde_json::from_slice(&json)
        .map_err(|e| CliError::Module(format!("{}: status is not JSON: {e}", path.display())))
}

/// p11shim's interface and its status document (two-call convention; the
/// document may grow between the calls, so it is asked again, at most
/// four times).
///
/// # Safety
/// `get_interface` is the `C_GetInterface` of an initialized module.
unsafe fn status(get_interface: GetInterface) -> Result<Vec<u8>, (&'static str, CK_RV)> {
    let mut iface: *mut CK_INTERFACE = std::ptr::null_mut();
    let mut name = *b"p11shim\0";
    // SAFETY: NUL-terminated name, no version, a valid out pointer.
    let rv = unsafe { get_interface(name.as_mut_ptr(), std::ptr::null_mut(), &raw mut iface, 0) };
    if rv != CKR_OK || iface.is_null() {
        return Err(("C_GetInterface(\"p11shim\")", rv));
    }
    // SAFETY: on CKR_OK the module returned a pointer to its static
    // interface, whose function list is a P11SHIM_FUNCTION_LIST.
    let list = unsafe {
        (*iface)
            .pFunctionList
            .cast::<P11shimFunctionList>()
            .as_ref()
    };
    let get_status = list
        .filter(|l| l.version.major == 1)
        .and_then(|l| l.get_status)
        .ok_or((
            "P11SHIM_FUNCTION_LIST (version 1.x)",
            pkcs11_sys::CKR_FUNCTION_NOT_SUPPORTED,
        ))?;
    for _ in 0..4 {
        let mut len: CK_ULONG = 0;
        // SAFETY: NULL buffer: the size query.
        let rv = unsafe { get_status(std::ptr::null_mut(), &raw mut len) };
        if rv != CKR_OK {
            return Err(("P11shim_GetStatus", rv));
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: `buf` holds `len` bytes.
        let rv = unsafe { get_status(buf.as_mut_ptr(), &raw mut len) };
        match rv {
            CKR_OK => {
                buf.truncate(len as usize);
                return Ok(buf);
            }
            CKR_BUFFER_TOO_SMALL => continue,
            rv => return Err(("P11shim_GetStatus", rv)),
        }
    }
    Err(("P11shim_GetStatus", CKR_BUFFER_TOO_SMALL))
}

pub fn run(args: &Args, style: &Style) -> Result<(), CliError> {
    let path = module_path(args.module.as_deref())?;
    let status = read_status(&path)?;
    if args.json {
        print_json(&status);
    } else {
        print_table(&status, style);
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        v => v.to_string(),
    }
}

fn print_table(status: &Value, style: &Style) {
    println!(
        "{} {} ({})",
        style.bold("p11shim"),
        text(&status["version"]),
        text(&status["config"])
    );
    if let Some(c) = status.get("credentials").filter(|c| !c.is_null()) {
        println!(
            "credentials: role {} via {} at {}: {}",
            text(&c["role"]),
            text(&c["method"]),
            text(&c["broker"]),
            text(&c["state"])
        );
    }
    let empty = Vec::new();
    let slots = status["slots"].as_array().unwrap_or(&empty);
    if slots.is_empty() {
        println!("no slots configured");
    }
    const HEAD: [&str; 10] = [
        "MEMBER",
        "TOKEN",
        "STATE",
        "LATENCY",
        "SESSIONS",
        "CALLS",
        "ERRORS",
        "FAILOVERS",
        "RECOVERIES",
        "DOWN",
    ];
    for s in slots {
        println!();
        println!(
            "{} {} {:?}  serial {}  sessions {}  logged in: {}",
            style.bold("slot"),
            text(&s["id"]),
            text(&s["label"]),
            text(&s["serial"]),
            text(&s["sessions"]),
            text(&s["logged_in"])
        );
        let members = s["members"].as_array().unwrap_or(&empty);
        let rows: Vec<[String; 10]> = members
            .iter()
            .map(|m| {
                [
                    text(&m["name"]),
                    text(&m["token"]),
                    text(&m["state"]),
                    match m["latency_us"].as_u64() {
                        Some(us) if m["sampled_calls"].as_u64().unwrap_or(0) > 0 => {
                            format!("{us} µs")
                        }
                        _ => "-".into(),
                    },
                    text(&m["sessions"]),
                    text(&m["sampled_calls"]),
                    text(&m["errors"]),
                    text(&m["failovers"]),
                    text(&m["recoveries"]),
                    m["down_ms"]
                        .as_u64()
                        .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                ]
            })
            .collect();
        let mut width: Vec<usize> = HEAD.iter().map(|h| h.chars().count()).collect();
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String], paint: &dyn Fn(usize, String) -> String| {
            let out: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = width[i].saturating_sub(c.chars().count());
                    paint(i, format!("{c}{}", " ".repeat(pad)))
                })
                .collect();
            println!("  {}", out.join("  ").trim_end());
        };
        let head: Vec<String> = HEAD.iter().map(|h| h.to_string()).collect();
        line(&head, &|_, c| style.dim(&c));
        for r in &rows {
            line(r, &|i, c| match (i, r[2].as_str()) {
                (2, "active") => style.ok(&c),
                (2, "standby" | "recovering") => style.warn(&c),
                (2, _) => style.error(&c),
                _ => c,
            });
        }
    }
}
