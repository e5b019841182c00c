//! What an ELF file asks of the host: its kind (executable, script, other), architecture, program
//! interpreter, `DT_NEEDED` libraries found in the stage, RPATH/RUNPATH or the system, and glibc
//! symbol versions.

use super::*;

/// What an ELF file says about how it is loaded.
#[derive(Debug, Clone, Default)]
pub(super) struct ElfInfo {
    pub(super) arch: Option<Arch>,
    pub(super) file_type: u16,
    /// `PT_INTERP`: the dynamic loader.
    pub(super) interpreter: Option<String>,
    /// `DT_NEEDED`, in order.
    pub(super) needed: Vec<String>,
    /// `DT_RPATH` and `DT_RUNPATH` entries, `$ORIGIN` unexpanded.
    pub(super) search: Vec<String>,
    /// `GLIBC_*` version names it needs (verneed), with the library each is needed from.
    pub(super) glibc_needed: Vec<(String, String)>,
    /// `GLIBC_*` version names it defines (verdef): what a libc.so.6 offers.
    pub(super) glibc_defined: Vec<String>,
}

pub(super) enum Kind {
    Elf(ElfInfo),
    /// `#!`: the interpreter named on the first line.
    Script(String),
    /// An ELF that cannot be parsed.
    BadElf(String),
    /// Anything else: its first bytes.
    Other(Vec<u8>),
}

pub(super) fn read_file_kind(path: &Path) -> io::Result<Kind> {
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

pub(super) fn parse_elf<Elf: FileHeader<Endian = Endianness>>(
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

pub(super) enum Lookup {
    Found(PathBuf),
    /// Found only built for another target (the loader skips those).
    WrongArch(PathBuf, Option<Arch>),
    Missing,
}

impl Lookup {
    pub(super) fn found(self) -> Option<PathBuf> {
        match self {
            Lookup::Found(p) => Some(p),
            _ => None,
        }
    }
}

/// The first `dir/name` that is an ELF for `arch`, as the dynamic loader searches.
pub(super) fn find_in(dirs: &[PathBuf], name: &str, arch: Arch) -> Lookup {
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

pub(super) fn elf_findings(
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
pub(super) fn expand_origin(path: &str, origin: &Path) -> PathBuf {
    let origin = origin.display().to_string();
    PathBuf::from(
        path.replace("${ORIGIN}", &origin)
            .replace("$ORIGIN", &origin),
    )
}

/// The highest numbered `GLIBC_x.y` needed against the host's; named ones (`GLIBC_ABI_DT_RELR`)
/// against the names the host's libc defines, when known.
pub(super) fn glibc_findings(
    needed: &[(String, Option<String>)],
    host: &Host,
    findings: &mut Vec<Finding>,
) {
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
