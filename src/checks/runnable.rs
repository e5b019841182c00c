//! Will it run here? Checks on a staged binary against this host, before the node needs it:
//!
//! - `elf`: what kind of file it is. An ELF executable is checked further; a script (`#!`) is
//!   legitimately runnable (its interpreter must exist), and only `version` applies to it;
//!   anything else cannot be executed at all.
//! - `arch`: the ELF's machine, class and byte order are the host's.
//! - `libraries`: its program interpreter exists, and every `DT_NEEDED` library is found in the
//!   upgrade's `lib/`, its RPATH/RUNPATH or the system's library directories, built for this
//!   host; libraries found in the upgrade's `lib/` are checked the same way, transitively.
//! - `glibc`: the highest `GLIBC_x.y` symbol version it (or a library of its `lib/`) needs is at
//!   most the host's glibc.
//! - `executable`: the file has an execute bit.
//! - `version`: only when asked ([`Execute::Version`]: `plan --run-version`, and `apply` after
//!   staging), where the manifest declares a version and nothing above failed: `<binary> version`
//!   prints that version, a leading `v` ignored on both sides. It runs with an environment
//!   cleared to `PATH`, `LD_LIBRARY_PATH` (the upgrade's `lib/`), and `HOME`, `TMPDIR` and the
//!   working directory all a temp dir removed afterwards (a daemon may write its config under
//!   `$HOME`); stdin closed; killed with its process group after a timeout.
//!
//! Everything but `version` only reads files: plain `plan` never executes what it finds in the
//! tree, which in CI may come from an untrusted pull request (DESIGN §4). Plan shows the findings
//! as warnings; `apply --strict` fails on them. Nothing here writes outside its temp dir.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, elf};
use schemars::JsonSchema;
use serde::Serialize;

use crate::apply::{Report, Status};
use crate::plan::{ArtifactKind, ArtifactState, ManifestKey, Plan};
use crate::tree::Layout;

/// How long `<binary> version` may take before it is killed.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Binaries checked at once (each may start a daemon's `version`).
const WORKERS: usize = 4;

/// `PATH` for `version`: the system's directories only (a `#!/usr/bin/env sh` script needs one).
const VERSION_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether the checks may execute the staged binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execute {
    /// Read the files only: `plan` by default.
    Nothing,
    /// Also run `<binary> version` where the manifest declares a version.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Not an executable format this host can run (neither an ELF executable nor a script).
    Elf,
    /// An ELF for another machine, class or byte order.
    Arch,
    /// The program interpreter or a `DT_NEEDED` library is missing, or built for another machine.
    Libraries,
    /// It needs a newer glibc than the host's.
    Glibc,
    /// No execute permission.
    Executable,
    /// `<binary> version` did not print the manifest's version (or failed, or timed out).
    Version,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Check::Elf => "elf",
            Check::Arch => "arch",
            Check::Libraries => "libraries",
            Check::Glibc => "glibc",
            Check::Executable => "executable",
            Check::Version => "version",
        })
    }
}

/// One reason a staged binary may not run on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Finding {
    pub check: Check,
    pub message: String,
}

impl Finding {
    fn new(check: Check, message: impl Into<String>) -> Self {
        Finding {
            check,
            message: message.into(),
        }
    }
}

/// The findings on one staged binary of the host's platform (only binaries with findings).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RunnableCheck {
    /// Relative to `$DAEMON_HOME/cosmovisor`, e.g. `upgrades/v26/bin/osmosisd`.
    pub destination: String,
    /// Where the manifest pins it.
    pub key: ManifestKey,
    pub findings: Vec<Finding>,
}

/// An ELF target: machine (`e_machine`), class and byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub machine: u16,
    pub class64: bool,
    pub big_endian: bool,
}

impl Arch {
    /// The architecture this cvx was built for, which is the host's.
    pub fn host() -> Option<Arch> {
        let machine = match std::env::consts::ARCH {
            "x86_64" => elf::EM_X86_64,
            "aarch64" => elf::EM_AARCH64,
            "x86" => elf::EM_386,
            "arm" => elf::EM_ARM,
            "riscv64" => elf::EM_RISCV,
            "powerpc64" => elf::EM_PPC64,
            "s390x" => elf::EM_S390,
            "loongarch64" => elf::EM_LOONGARCH,
            _ => return None,
        };
        Some(Arch {
            machine: machine.0,
            class64: cfg!(target_pointer_width = "64"),
            big_endian: cfg!(target_endian = "big"),
        })
    }

    /// From the first 20 bytes of an ELF file; None when it is not one.
    fn of_header(head: &[u8]) -> Option<Arch> {
        if head.len() < 20 || &head[..4] != b"\x7fELF" {
            return None;
        }
        let big_endian = head[5] == elf::ELFDATA2MSB.0;
        let bytes = [head[18], head[19]];
        Some(Arch {
            machine: if big_endian {
                u16::from_be_bytes(bytes)
            } else {
                u16::from_le_bytes(bytes)
            },
            class64: head[4] == elf::ELFCLASS64.0,
            big_endian,
        })
    }

    fn machine_name(self) -> String {
        let name = match elf::Machine(self.machine) {
            elf::EM_X86_64 => "x86-64 (amd64)",
            elf::EM_AARCH64 => "AArch64 (arm64)",
            elf::EM_386 => "x86 (i386)",
            elf::EM_ARM => "32-bit ARM",
            elf::EM_RISCV => "RISC-V",
            elf::EM_PPC64 => "PowerPC64",
            elf::EM_PPC => "PowerPC",
            elf::EM_S390 => "s390x",
            elf::EM_MIPS => "MIPS",
            elf::EM_LOONGARCH => "LoongArch",
            _ => return format!("machine {}", self.machine),
        };
        name.to_string()
    }

    /// How `self` differs from `host`, for a message.
    fn describe_against(self, host: Arch) -> String {
        if self.machine != host.machine {
            return format!(
                "built for {}; this host is {}",
                self.machine_name(),
                host.machine_name()
            );
        }
        let class = |a: Arch| if a.class64 { "64-bit" } else { "32-bit" };
        let order = |a: Arch| {
            if a.big_endian {
                "big-endian"
            } else {
                "little-endian"
            }
        };
        format!(
            "a {} {} {} ELF; this host runs {} {} ones",
            class(self),
            order(self),
            self.machine_name(),
            class(host),
            order(host)
        )
    }
}

/// A glibc version, `2.36` or `2.2.5`, compared component by component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GlibcVersion(pub Vec<u32>);

impl GlibcVersion {
    /// `2.36`, `2.2.5`; None for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let parts: Option<Vec<u32>> = text.split('.').map(|p| p.parse().ok()).collect();
        parts.filter(|p| p.len() >= 2).map(GlibcVersion)
    }

    /// From a symbol version name: `GLIBC_2.34` -> 2.34; `GLIBC_PRIVATE` -> None.
    fn of_symbol_version(name: &str) -> Option<Self> {
        name.strip_prefix("GLIBC_").and_then(Self::parse)
    }
}

impl fmt::Display for GlibcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u32::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

/// What this host offers a binary: detected once per command.
#[derive(Debug, Clone)]
pub struct Host {
    /// None on an architecture cvx does not know the ELF machine of: no `arch` check then.
    pub arch: Option<Arch>,
    /// The highest `GLIBC_x.y` its libc.so.6 defines; None without glibc (or when unknown).
    pub glibc: Option<GlibcVersion>,
    /// Every `GLIBC_*` version name its libc.so.6 defines (empty when unknown).
    pub glibc_names: BTreeSet<String>,
    /// Where the dynamic loader looks by default: multiarch, lib64, lib, ld.so.conf's.
    pub lib_dirs: Vec<PathBuf>,
}

impl Host {
    pub fn detect() -> Host {
        let arch = Arch::host();
        let lib_dirs = system_lib_dirs();
        let (glibc, glibc_names) = match arch
            .and_then(|a| find_in(&lib_dirs, "libc.so.6", a).found())
            .and_then(|libc| read_file_kind(&libc).ok())
        {
            Some(Kind::Elf(libc)) => {
                let highest = libc
                    .glibc_defined
                    .iter()
                    .filter_map(|n| GlibcVersion::of_symbol_version(n))
                    .max();
                (highest, libc.glibc_defined.into_iter().collect())
            }
            _ => (None, BTreeSet::new()),
        };
        let glibc = glibc.or_else(ldd_version);
        tracing::debug!(
            "host: {:?}, glibc {:?}, library directories {:?}",
            arch,
            glibc.as_ref().map(ToString::to_string),
            lib_dirs
        );
        Host {
            arch,
            glibc,
            glibc_names,
            lib_dirs,
        }
    }
}

/// The glibc version from `ldd --version`'s first line (`ldd (Debian GLIBC 2.36-9) 2.36`).
fn ldd_version() -> Option<GlibcVersion> {
    let out = Command::new("ldd")
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?;
    if !first.contains("GLIBC") && !first.contains("GNU libc") {
        return None;
    }
    GlibcVersion::parse(first.split_whitespace().last()?)
}

fn multiarch_triple() -> Option<&'static str> {
    Some(match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "x86" => "i386-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        "loongarch64" => "loongarch64-linux-gnu",
        _ => return None,
    })
}

/// The dynamic loader's default directories, then those of `/etc/ld.so.conf`.
fn system_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(triple) = multiarch_triple() {
        dirs.push(PathBuf::from("/lib").join(triple));
        dirs.push(PathBuf::from("/usr/lib").join(triple));
    }
    for d in ["/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib"] {
        dirs.push(PathBuf::from(d));
    }
    let mut seen_conf = BTreeSet::new();
    ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, &mut seen_conf);
    let mut unique = BTreeSet::new();
    dirs.retain(|d| unique.insert(d.clone()) && d.is_dir());
    dirs
}

/// The directories one ld.so.conf file lists, following `include` (a `*` in the file name).
fn ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>, seen: &mut BTreeSet<PathBuf>) {
    let key = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if seen.len() > 64 || !seen.insert(key) {
        return;
    }
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let base = path.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            let pattern = pattern.trim();
            if pattern.is_empty()
                || line
                    .as_bytes()
                    .get(7)
                    .is_some_and(|b| !b.is_ascii_whitespace())
            {
                continue;
            }
            for file in glob_file_name(&base.join(pattern)) {
                ld_so_conf(&file, dirs, seen);
            }
        } else if line.starts_with('/') {
            // Old syntax `DIR=TYPE` and lists separated by commas or spaces.
            for dir in line
                .split([',', ' ', '\t', ':'])
                .filter(|d| d.starts_with('/'))
            {
                dirs.push(PathBuf::from(dir.split('=').next().unwrap_or(dir)));
            }
        }
    }
}

/// The files matching `pattern`, whose last component may hold `*` wildcards; sorted.
fn glob_file_name(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    if !name.contains('*') {
        return vec![pattern.to_path_buf()];
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| wildcard_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// `*` matches any run of characters; everything else itself.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == text;
    }
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// What an ELF file says about how it is loaded.
#[derive(Debug, Clone, Default)]
struct ElfInfo {
    arch: Option<Arch>,
    file_type: u16,
    /// `PT_INTERP`: the dynamic loader.
    interpreter: Option<String>,
    /// `DT_NEEDED`, in order.
    needed: Vec<String>,
    /// `DT_RPATH` and `DT_RUNPATH` entries, `$ORIGIN` unexpanded.
    search: Vec<String>,
    /// `GLIBC_*` version names it needs (verneed), with the library each is needed from.
    glibc_needed: Vec<(String, String)>,
    /// `GLIBC_*` version names it defines (verdef): what a libc.so.6 offers.
    glibc_defined: Vec<String>,
}

enum Kind {
    Elf(ElfInfo),
    /// `#!`: the interpreter named on the first line.
    Script(String),
    /// An ELF that cannot be parsed.
    BadElf(String),
    /// Anything else: its first bytes.
    Other(Vec<u8>),
}

fn read_file_kind(path: &Path) -> io::Result<Kind> {
    let mut file = File::open(path)?;
    let mut head = [0u8; 256];
    let mut len = 0;
    while len < head.len() {
        match file.read(&mut head[len..])? {
            0 => break,
            n => len += n,
        }
    }
    let head = &head[..len];
    if head.starts_with(b"#!") {
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let interpreter = line.split_whitespace().next().unwrap_or("").to_string();
        return Ok(Kind::Script(interpreter));
    }
    if !head.starts_with(b"\x7fELF") {
        return Ok(Kind::Other(head[..head.len().min(8)].to_vec()));
    }
    file.rewind()?;
    let cache = ReadCache::new(file);
    let parsed = match head.get(4).copied().map(elf::FileClass) {
        Some(elf::ELFCLASS64) => parse_elf::<elf::FileHeader64<Endianness>>(&cache),
        Some(elf::ELFCLASS32) => parse_elf::<elf::FileHeader32<Endianness>>(&cache),
        _ => return Ok(Kind::BadElf("unknown ELF class".into())),
    };
    Ok(match parsed {
        Ok(mut info) => {
            info.arch = Arch::of_header(head);
            Kind::Elf(info)
        }
        Err(e) => Kind::BadElf(e.to_string()),
    })
}

fn parse_elf<Elf: FileHeader<Endian = Endianness>>(
    data: &ReadCache<File>,
) -> object::read::Result<ElfInfo> {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let header = Elf::parse(data)?;
    let endian = header.endian()?;
    let mut info = ElfInfo {
        file_type: header.e_type(endian).0,
        ..ElfInfo::default()
    };
    for segment in header.program_headers(endian, data)? {
        if let Some(interpreter) = segment.interpreter(endian, data)? {
            info.interpreter = Some(text(interpreter));
        }
    }
    let sections = header.sections(endian, data)?;
    let dynamic = sections.dynamic_table(endian, data)?;
    for entry in &dynamic {
        if entry.tag == elf::DT_NEEDED {
            info.needed.push(text(dynamic.string(entry)?));
        } else if entry.tag == elf::DT_RPATH || entry.tag == elf::DT_RUNPATH {
            let paths = text(dynamic.string(entry)?);
            info.search
                .extend(paths.split(':').filter(|p| !p.is_empty()).map(String::from));
        }
    }
    if let Some((mut needs, link)) = sections.gnu_verneed(endian, data)? {
        let strings = sections.strings(endian, data, link)?;
        while let Some((need, mut aux)) = needs.next()? {
            let library = text(need.file(endian, strings)?);
            while let Some(version) = aux.next()? {
                let name = version.name(endian, strings)?;
                if name.starts_with(b"GLIBC_") {
                    info.glibc_needed.push((text(name), library.clone()));
                }
            }
        }
    }
    if let Some((mut defs, link)) = sections.gnu_verdef(endian, data)? {
        let strings = sections.strings(endian, data, link)?;
        while let Some((_, mut aux)) = defs.next()? {
            // The first auxiliary entry names the version; the others its parents.
            if let Some(name) = aux.next()? {
                let name = name.name(endian, strings)?;
                if name.starts_with(b"GLIBC_") {
                    info.glibc_defined.push(text(name));
                }
            }
        }
    }
    Ok(info)
}

enum Lookup {
    Found(PathBuf),
    /// Found only built for another target (the loader skips those).
    WrongArch(PathBuf, Option<Arch>),
    Missing,
}

impl Lookup {
    fn found(self) -> Option<PathBuf> {
        match self {
            Lookup::Found(p) => Some(p),
            _ => None,
        }
    }
}

/// The first `dir/name` that is an ELF for `arch`, as the dynamic loader searches.
fn find_in(dirs: &[PathBuf], name: &str, arch: Arch) -> Lookup {
    let mut wrong = None;
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        dirs.iter().map(|d| d.join(name)).collect()
    };
    for path in candidates {
        let Ok(mut file) = File::open(&path) else {
            continue;
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let mut head = [0u8; 20];
        let found = file
            .read_exact(&mut head)
            .ok()
            .and_then(|()| Arch::of_header(&head));
        if found == Some(arch) {
            return Lookup::Found(path);
        }
        wrong.get_or_insert((path, found));
    }
    match wrong {
        Some((path, found)) => Lookup::WrongArch(path, found),
        None => Lookup::Missing,
    }
}

/// Check the file at `binary`, staged with the libraries in `stage_lib`, against `host`; run
/// `<binary> version` when `expected_version` is declared and nothing else stands in the way.
pub fn check(
    binary: &Path,
    stage_lib: &Path,
    expected_version: Option<&str>,
    host: &Host,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let meta = match fs::metadata(binary) {
        Ok(meta) => meta,
        Err(e) => return vec![Finding::new(Check::Elf, format!("cannot read it: {e}"))],
    };
    match read_file_kind(binary) {
        Err(e) => findings.push(Finding::new(Check::Elf, format!("cannot read it: {e}"))),
        Ok(Kind::Other(head)) => findings.push(Finding::new(
            Check::Elf,
            format!(
                "neither an ELF executable nor a script (#!): the kernel cannot run it (it starts with {:?})",
                String::from_utf8_lossy(&head)
            ),
        )),
        Ok(Kind::BadElf(e)) => {
            findings.push(Finding::new(Check::Elf, format!("a malformed ELF file: {e}")))
        }
        // A script is runnable as such; only its interpreter and `version` can be checked.
        Ok(Kind::Script(interpreter)) => {
            if interpreter.starts_with('/') && !Path::new(&interpreter).exists() {
                findings.push(Finding::new(
                    Check::Elf,
                    format!("a script whose interpreter {interpreter} does not exist here"),
                ));
            }
        }
        Ok(Kind::Elf(info)) => elf_findings(binary, &info, stage_lib, host, &mut findings),
    }
    if meta.permissions().mode() & 0o111 == 0 {
        findings.push(Finding::new(
            Check::Executable,
            format!(
                "mode {:04o}: not executable, so the node cannot be started from it (apply stages binaries 0755)",
                meta.permissions().mode() & 0o7777
            ),
        ));
    }
    if let Some(expected) = expected_version
        && findings.is_empty()
        && let Some(finding) = version_finding(binary, stage_lib, expected)
    {
        findings.push(finding);
    }
    findings
}

fn elf_findings(
    binary: &Path,
    info: &ElfInfo,
    stage_lib: &Path,
    host: &Host,
    findings: &mut Vec<Finding>,
) {
    let type_name = match elf::FileType(info.file_type) {
        elf::ET_EXEC | elf::ET_DYN => None,
        elf::ET_REL => Some("a relocatable object (.o)"),
        elf::ET_CORE => Some("a core dump"),
        _ => Some("an ELF file of unknown type"),
    };
    if let Some(name) = type_name {
        findings.push(Finding::new(
            Check::Elf,
            format!("{name}, not an executable"),
        ));
        return;
    }
    let Some(host_arch) = host.arch else {
        return;
    };
    match info.arch {
        Some(arch) if arch == host_arch => {}
        Some(arch) => {
            // Nothing else can be judged: its loader and libraries are another machine's.
            findings.push(Finding::new(Check::Arch, arch.describe_against(host_arch)));
            return;
        }
        None => return,
    }
    if let Some(interpreter) = &info.interpreter
        && !Path::new(interpreter).exists()
    {
        findings.push(Finding::new(
            Check::Libraries,
            format!(
                "its program interpreter (dynamic loader) {interpreter} does not exist here: built for another libc or distribution"
            ),
        ));
    }

    // The binary, then each library it gets from the upgrade's lib/, transitively: those ship
    // with the upgrade (libwasmvm), so their own needs are the upgrade's too.
    let mut queue = vec![(binary.to_path_buf(), None::<String>, info.clone())];
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    let mut glibc_needed: Vec<(String, Option<String>)> = Vec::new();
    while let Some((path, label, current)) = queue.pop() {
        let who = label
            .as_ref()
            .map_or_else(|| "needs".to_string(), |l| format!("{l} (in lib/) needs"));
        let origin = path.parent().unwrap_or(Path::new("/"));
        let mut dirs = vec![stage_lib.to_path_buf()];
        dirs.extend(current.search.iter().map(|s| expand_origin(s, origin)));
        dirs.extend(host.lib_dirs.iter().cloned());
        for name in &current.needed {
            match find_in(&dirs, name, host_arch) {
                Lookup::Found(found) => {
                    if found.starts_with(stage_lib)
                        && seen.insert(found.clone())
                        && let Ok(Kind::Elf(lib)) = read_file_kind(&found)
                    {
                        queue.push((found, Some(name.clone()), lib));
                    }
                }
                Lookup::WrongArch(found, arch) => findings.push(Finding::new(
                    Check::Libraries,
                    format!(
                        "{who} {name}: {} is {}",
                        found.display(),
                        arch.map_or("not an ELF library".into(), |a| a
                            .describe_against(host_arch))
                    ),
                )),
                Lookup::Missing => findings.push(Finding::new(
                    Check::Libraries,
                    format!(
                        "{who} {name}, found neither in {} nor in the system's library directories",
                        stage_lib.display()
                    ),
                )),
            }
        }
        glibc_needed.extend(
            current
                .glibc_needed
                .iter()
                .map(|(version, _)| (version.clone(), label.clone())),
        );
    }
    glibc_findings(&glibc_needed, host, findings);
}

/// `$ORIGIN` (or `${ORIGIN}`) is the directory of the file that names the path.
fn expand_origin(path: &str, origin: &Path) -> PathBuf {
    let origin = origin.display().to_string();
    PathBuf::from(
        path.replace("${ORIGIN}", &origin)
            .replace("$ORIGIN", &origin),
    )
}

/// The highest numbered `GLIBC_x.y` needed against the host's; named ones (`GLIBC_ABI_DT_RELR`)
/// against the names the host's libc defines, when known.
fn glibc_findings(needed: &[(String, Option<String>)], host: &Host, findings: &mut Vec<Finding>) {
    let Some(host_glibc) = &host.glibc else {
        return;
    };
    let who = |label: &Option<String>| {
        label
            .as_ref()
            .map_or_else(|| "needs".to_string(), |l| format!("{l} (in lib/) needs"))
    };
    // Per file (the binary, then each library of lib/): its highest numbered version.
    let mut files: Vec<&Option<String>> = Vec::new();
    for (_, label) in needed {
        if !files.contains(&label) {
            files.push(label);
        }
    }
    for file in files {
        let highest = needed
            .iter()
            .filter(|(_, label)| label == file)
            .filter_map(|(name, _)| GlibcVersion::of_symbol_version(name).map(|v| (v, name)))
            .max_by(|a, b| a.0.cmp(&b.0));
        if let Some((version, name)) = highest
            && version > *host_glibc
        {
            findings.push(Finding::new(
                Check::Glibc,
                format!("{} {name}; this host's glibc is {host_glibc}", who(file)),
            ));
        }
    }
    if host.glibc_names.is_empty() {
        return;
    }
    let mut reported = BTreeSet::new();
    for (name, label) in needed {
        if GlibcVersion::of_symbol_version(name).is_none()
            && name != "GLIBC_PRIVATE"
            && !host.glibc_names.contains(name)
            && reported.insert((name, label))
        {
            findings.push(Finding::new(
                Check::Glibc,
                format!(
                    "{} {name}, which this host's glibc ({host_glibc}) does not define",
                    who(label)
                ),
            ));
        }
    }
}

/// `v26.0.0` and `26.0.0` are the same version.
fn strip_v(text: &str) -> &str {
    text.trim().strip_prefix(['v', 'V']).unwrap_or(text.trim())
}

/// Whether `version`'s output states `expected`: the whole output, or one of its lines (daemons
/// may log a warning first).
pub fn version_matches(output: &str, expected: &str) -> bool {
    let want = strip_v(expected);
    !want.is_empty()
        && (strip_v(output) == want || output.lines().any(|line| strip_v(line) == want))
}

/// The first lines of an output, for a message.
fn excerpt(output: &str) -> String {
    let trimmed = output.trim();
    if trimmed.is_empty() {
        return "nothing".into();
    }
    let mut text: String = trimmed.lines().take(3).collect::<Vec<_>>().join(" / ");
    if text.chars().count() > 200 {
        text = text.chars().take(200).collect::<String>() + "…";
    } else if trimmed.lines().count() > 3 {
        text.push_str(" / …");
    }
    format!("{text:?}")
}

/// Run `<binary> version` and compare what it prints with `expected`; None when it matches.
fn version_finding(binary: &Path, stage_lib: &Path, expected: &str) -> Option<Finding> {
    let name = binary.file_name().map_or_else(
        || binary.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let command = format!("`{name} version`");
    let fail = |message: String| Some(Finding::new(Check::Version, message));
    match run_version(binary, stage_lib, VERSION_TIMEOUT) {
        Err(e) => fail(format!("{command} could not be started: {e}")),
        Ok(Ran::TimedOut) => fail(format!(
            "{command} did not finish within {}s (killed); the manifest declares {expected}",
            VERSION_TIMEOUT.as_secs()
        )),
        Ok(Ran::Exited {
            success,
            code,
            output,
        }) => {
            if !success {
                let status = code.map_or("was killed by a signal".into(), |c| {
                    format!("exited with status {c}")
                });
                fail(format!("{command} {status}, printing {}", excerpt(&output)))
            } else if !version_matches(&output, expected) {
                fail(format!(
                    "{command} printed {}; the manifest declares {expected}",
                    excerpt(&output)
                ))
            } else {
                None
            }
        }
    }
}

enum Ran {
    Exited {
        success: bool,
        code: Option<i32>,
        /// stdout and stderr, interleaved as written.
        output: String,
    },
    TimedOut,
}

/// `<binary> version` in its own process group: stdin closed, an environment of `PATH`, the
/// stage's `lib/` on `LD_LIBRARY_PATH`, and `HOME`, `TMPDIR` and the working directory a temp dir
/// removed afterwards (no proxy, no credentials, no real home to write config into); killed with
/// everything it started after `timeout`.
fn run_version(binary: &Path, stage_lib: &Path, timeout: Duration) -> io::Result<Ran> {
    let home = tempfile::Builder::new()
        .prefix("cvx-version-home-")
        .tempdir()?;
    let mut output = tempfile::tempfile()?;
    let mut command = Command::new(binary);
    command
        .arg("version")
        .env_clear()
        .env("PATH", VERSION_PATH)
        .env("HOME", home.path())
        .env("TMPDIR", home.path())
        .env("LD_LIBRARY_PATH", stage_lib)
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output.try_clone()?)
        .process_group(0);
    let mut child = command.spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() >= timeout {
            // The whole group: a script's own children would hold the output open.
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::KILL,
            );
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let Some(status) = status else {
        return Ok(Ran::TimedOut);
    };
    output.rewind()?;
    let mut bytes = Vec::new();
    output.take(64 * 1024).read_to_end(&mut bytes)?;
    Ok(Ran::Exited {
        success: status.success(),
        code: status.code(),
        output: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// One binary to check.
struct Target {
    destination: String,
    key: ManifestKey,
    path: PathBuf,
    stage_lib: PathBuf,
    version: Option<String>,
}

/// Check `targets` a few at a time; the ones with findings, in order.
fn check_all(targets: Vec<Target>, execute: Execute) -> Vec<RunnableCheck> {
    if targets.is_empty() {
        return Vec::new();
    }
    let host = Host::detect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Vec<Finding>>> =
        targets.iter().map(|_| Default::default()).collect();
    std::thread::scope(|scope| {
        for _ in 0..WORKERS.min(targets.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(t) = targets.get(i) else { break };
                    let version = match execute {
                        Execute::Version => t.version.as_deref(),
                        Execute::Nothing => None,
                    };
                    let findings = check(&t.path, &t.stage_lib, version, &host);
                    *results[i].lock().expect("no worker panics") = findings;
                }
            });
        }
    });
    targets
        .into_iter()
        .zip(results)
        .filter_map(|(t, r)| {
            let findings = r.into_inner().expect("no worker panics");
            (!findings.is_empty()).then_some(RunnableCheck {
                destination: t.destination,
                key: t.key,
                findings,
            })
        })
        .collect()
}

/// The binaries of `plan` that pass `keep`, when the plan is for this host's platform.
fn targets(
    plan: &Plan,
    layout: &Layout,
    keep: impl Fn(&crate::plan::ArtifactPlan) -> bool,
) -> Vec<Target> {
    if plan.platform != crate::platform::host_platform() {
        return Vec::new();
    }
    // Absolute: `version` runs in a temp dir, with the stage's lib/ on LD_LIBRARY_PATH.
    let root = std::path::absolute(layout.root()).unwrap_or_else(|_| layout.root());
    plan.upgrades
        .iter()
        .flat_map(|stage| {
            stage
                .artifacts
                .iter()
                .filter(|a| a.kind == ArtifactKind::Binary && keep(a))
                .map(|a| Target {
                    destination: a.destination.clone(),
                    key: a.key.clone(),
                    path: root.join(&a.destination),
                    stage_lib: root.join(&stage.dir).join("lib"),
                    version: stage.version.clone(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// For `cvx plan`: every binary of the host's platform that is staged and verified (state `ok`),
/// when the plan is for this host. `version` runs only with [`Execute::Version`]
/// (`--run-version`): by default nothing found in the tree is executed.
pub fn check_plan(plan: &Plan, execute: Execute) -> Vec<RunnableCheck> {
    let Some(home) = &plan.home else {
        return Vec::new();
    };
    check_all(
        targets(plan, &Layout::new(home), |a| a.state == ArtifactState::Ok),
        execute,
    )
}

/// For `cvx apply`: every binary now in place (unchanged or staged by this run), `version`
/// included: the host asked for these bytes. The findings are logged as warnings; with `strict`
/// as errors, and they make the report fail (the files stay staged: they are the verified bytes).
pub fn after_apply(report: &mut Report, plan: &Plan, layout: &Layout, strict: bool) {
    let in_place = |a: &crate::plan::ArtifactPlan| {
        report.actions.iter().any(|action| {
            action.destination == a.destination
                && matches!(action.status, Status::Changed | Status::Unchanged)
        })
    };
    let checks = check_all(targets(plan, layout, in_place), Execute::Version);
    if checks.is_empty() {
        return;
    }
    for c in &checks {
        for f in &c.findings {
            if strict {
                tracing::error!("{} ({}): {}", c.destination, f.check, f.message);
            } else {
                tracing::warn!("{} ({}): {}", c.destination, f.check, f.message);
            }
        }
    }
    if strict {
        let list: Vec<String> = checks
            .iter()
            .flat_map(|c| {
                c.findings
                    .iter()
                    .map(move |f| format!("{} ({}): {}", c.destination, f.check, f.message))
            })
            .collect();
        report.failed = true;
        report.error = Some(format!(
            "--strict: {} staged binar{} will not run as declared on this host: {}",
            checks.len(),
            if checks.len() == 1 { "y" } else { "ies" },
            list.join("; ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_match_with_or_without_v() {
        assert!(version_matches("v26.0.0\n", "v26.0.0"));
        assert!(version_matches("26.0.0", "v26.0.0"));
        assert!(version_matches("v26.0.0", "26.0.0"));
        assert!(version_matches("WARN something\nv26.0.0\n", "v26.0.0"));
        assert!(!version_matches("v26.0.1", "v26.0.0"));
        assert!(!version_matches("", "v26.0.0"));
        assert!(!version_matches("v", "v"));
    }

    #[test]
    fn glibc_versions_compare_by_component() {
        let v = |s| GlibcVersion::of_symbol_version(s).unwrap();
        assert!(v("GLIBC_2.2.5") < v("GLIBC_2.17"));
        assert!(v("GLIBC_2.34") < v("GLIBC_2.36"));
        assert!(v("GLIBC_2.36") < v("GLIBC_9.34"));
        assert_eq!(v("GLIBC_2.2.5").to_string(), "2.2.5");
        assert_eq!(GlibcVersion::of_symbol_version("GLIBC_PRIVATE"), None);
        assert_eq!(GlibcVersion::of_symbol_version("GLIBC_ABI_DT_RELR"), None);
    }

    #[test]
    fn wildcards_in_ld_so_conf_includes() {
        assert!(wildcard_match("*.conf", "libc.conf"));
        assert!(wildcard_match("x86_64-*.conf", "x86_64-linux-gnu.conf"));
        assert!(!wildcard_match("*.conf", "libc.conf.bak"));
        assert!(wildcard_match("a*b*c", "a-b-c"));
        assert!(!wildcard_match("a*b*c", "a-c"));
    }

    #[test]
    fn ld_so_conf_includes_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("conf.d")).unwrap();
        fs::write(
            d.join("ld.so.conf"),
            "# comment\ninclude conf.d/*.conf\n/opt/first\n",
        )
        .unwrap();
        fs::write(d.join("conf.d/a.conf"), "/opt/a # trailing\n").unwrap();
        fs::write(d.join("conf.d/b.conf"), "include ../ld.so.conf\n/opt/b\n").unwrap();
        fs::write(d.join("conf.d/skip.txt"), "/opt/skipped\n").unwrap();
        let mut dirs = Vec::new();
        ld_so_conf(&d.join("ld.so.conf"), &mut dirs, &mut BTreeSet::new());
        let dirs: Vec<String> = dirs.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(dirs, ["/opt/a", "/opt/b", "/opt/first"]);
    }

    #[test]
    fn the_host_is_detected() {
        let host = Host::detect();
        assert!(host.arch.is_some(), "{host:?}");
        assert!(!host.lib_dirs.is_empty(), "{host:?}");
        // This crate is built for glibc on Linux (target_env = "gnu"): its libc must be found.
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(host.glibc.is_some(), "{host:?}");
            assert!(
                host.glibc_names.contains("GLIBC_2.17") || host.glibc_names.contains("GLIBC_2.2.5")
            );
        }
    }
}
