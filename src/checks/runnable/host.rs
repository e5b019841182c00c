//! What this host offers a binary: its ELF architecture, its glibc, and where its dynamic loader
//! looks for libraries (multiarch, lib64, lib, ld.so.conf).

use super::*;

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
    pub(super) fn of_header(head: &[u8]) -> Option<Arch> {
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
    pub(super) fn describe_against(self, host: Arch) -> String {
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
    pub(super) fn of_symbol_version(name: &str) -> Option<Self> {
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
pub(super) fn ldd_version() -> Option<GlibcVersion> {
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

pub(super) fn multiarch_triple() -> Option<&'static str> {
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
pub(super) fn system_lib_dirs() -> Vec<PathBuf> {
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
pub(super) fn ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>, seen: &mut BTreeSet<PathBuf>) {
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
pub(super) fn glob_file_name(pattern: &Path) -> Vec<PathBuf> {
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
pub(super) fn wildcard_match(pattern: &str, text: &str) -> bool {
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
