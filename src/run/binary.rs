//! Which bytes may run (DESIGN §5, 2 and 4a): a stage's binary is checked before every exec, at
//! launch and at the switch. A binary cvx staged must still match its receipt (identity, else a
//! re-hash); with `CVX_MANIFEST`, the staged bytes must also come from the manifest's pin for this
//! host. A binary with no receipt (staged by hand or by Cosmovisor) runs with a warning, unless the
//! manifest pins a plain binary its bytes do not match.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::manifest::{Artifact, Manifest, Trigger};
use crate::tree::{self, Layout, PlanInfo};

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("no binary at {}", path.display())]
    Missing { path: PathBuf },
    #[error("{} changed since cvx staged it (sha256 {actual}, receipt says {expected}); refusing to run unverified bytes", path.display())]
    Tampered {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{} is not what the manifest {} pins for {platform}: {found}; the manifest pins {} (sha256 {})", path.display(), manifest.display(), pin.url, pin.sha256)]
    NotPinned {
        path: PathBuf,
        manifest: PathBuf,
        platform: String,
        found: String,
        pin: Box<Artifact>,
    },
    #[error("cannot read the manifest {} to verify the binary against its pin: {detail}", path.display())]
    Manifest { path: PathBuf, detail: String },
    #[error(transparent)]
    Io(#[from] crate::errors::IoError),
}

impl BinaryError {
    /// The obvious fix.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            BinaryError::Missing { .. } => "stage it with `cvx apply`".into(),
            BinaryError::Tampered { .. } => "find out who changed it, then stage the pinned bytes again with `cvx apply` (`--force` for the stage current points to)".into(),
            BinaryError::NotPinned { .. } => "run `cvx apply` to stage the pinned binary (`--force` for the stage current points to)".into(),
            BinaryError::Manifest { .. } => "fix the manifest (`cvx plan -m PATH` shows every problem), or unset CVX_MANIFEST".into(),
            BinaryError::Io(_) => return None,
        })
    }
}

/// The manifest whose pins the binaries must match, when `CVX_MANIFEST` names one.
pub struct Pins {
    path: PathBuf,
    manifest: Manifest,
    platform: String,
    recase: bool,
}

impl Pins {
    /// Read the manifest at `path` (None without `CVX_MANIFEST`). Read at each check, so a
    /// manifest updated while the node runs is the one the next switch obeys.
    pub fn load(path: Option<&Path>, recase: bool) -> Result<Option<Pins>, BinaryError> {
        let Some(path) = path else {
            return Ok(None);
        };
        // Read with serde alone, not the validating reader: the supervisor only compares pins
        // (`cvx plan` is where a manifest is validated), and the validator's code and
        // allocations would stay resident in a process that runs for months.
        let manifest_err = |detail: String| BinaryError::Manifest {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| manifest_err(e.to_string()))?;
        let mut manifest: Manifest =
            toml::from_str(&text).map_err(|e| manifest_err(e.to_string()))?;
        let pins = manifest.genesis.binary.values_mut().chain(
            manifest
                .upgrades
                .iter_mut()
                .flat_map(|u| u.binary.values_mut()),
        );
        for pin in pins {
            // As the validator reads them: `sha256:HEX` and upper case are the same pin.
            pin.sha256 = pin
                .sha256
                .trim_start_matches("sha256:")
                .to_ascii_lowercase();
        }
        Ok(Some(Pins {
            path: path.to_path_buf(),
            manifest,
            platform: crate::platform::host_platform(),
            recase,
        }))
    }

    /// The manifest's chain id.
    pub fn chain_id(&self) -> &str {
        &self.manifest.chain.id
    }

    /// The manifest's upgrade right after `stage`, if any.
    fn next(&self, stage: &str) -> Option<&crate::manifest::Upgrade> {
        let upgrades = &self.manifest.upgrades;
        let from = if stage == tree::GENESIS {
            0
        } else {
            upgrades
                .iter()
                .position(|u| tree::upgrade_dir(&u.name, self.recase) == stage)?
                + 1
        };
        upgrades.get(from)
    }

    /// The name of the manifest's upgrade right after `stage`, if any.
    pub fn next_after(&self, stage: &str) -> Option<String> {
        self.next(stage).map(|u| u.name.clone())
    }

    /// The manifest's upgrade right after `stage` as the plan it will be, when its height is set.
    pub fn next_plan_after(&self, stage: &str) -> Option<PlanInfo> {
        let upgrade = self.next(stage)?;
        Some(PlanInfo {
            name: upgrade.name.clone(),
            height: upgrade.height?,
            info: String::new(),
        })
    }

    /// The first upgrade with `trigger = "halt-height"` after `stage` in the manifest (all of
    /// them when the manifest does not name the stage), as the plan cvx will perform.
    pub fn scheduled_after(&self, stage: &str) -> Option<PlanInfo> {
        let upgrades = &self.manifest.upgrades;
        let from = if stage == tree::GENESIS {
            0
        } else {
            upgrades
                .iter()
                .position(|u| tree::upgrade_dir(&u.name, self.recase) == stage)
                .map_or(0, |i| i + 1)
        };
        upgrades[from..]
            .iter()
            .find(|u| u.trigger == Trigger::HaltHeight)
            .and_then(|u| {
                Some(PlanInfo {
                    name: u.name.clone(),
                    height: u.height?,
                    info: String::new(),
                })
            })
    }

    /// The pin of `stage` (`genesis` or `upgrades/<dir>`) for this host, if the manifest has one.
    pub fn binary(&self, stage: &str) -> Option<&Artifact> {
        let binaries = if stage == tree::GENESIS {
            &self.manifest.genesis.binary
        } else {
            &self
                .manifest
                .upgrades
                .iter()
                .find(|u| tree::upgrade_dir(&u.name, self.recase) == stage)?
                .binary
        };
        binaries.get(&self.platform)
    }
}

/// The path of `stage`'s binary once it is proven fit to run; see the module's rules.
pub fn verify(
    layout: &Layout,
    daemon: &str,
    stage: &str,
    pins: Option<&Pins>,
) -> Result<PathBuf, BinaryError> {
    let rel = format!("{stage}/bin/{daemon}");
    let path = layout.root().join(&rel);
    let meta = match fs::metadata(&path) {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) => return Err(BinaryError::Missing { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BinaryError::Missing { path }),
        Err(source) => {
            return Err(BinaryError::Io(crate::errors::IoError {
                action: "inspect",
                path,
                source,
            }));
        }
    };
    let pin = pins.and_then(|p| p.binary(stage).map(|a| (p, a)));
    let hash = |path: &Path| {
        crate::hash::sha256_file_small(path)
            .map(|(sha, _)| sha)
            .map_err(|source| {
                BinaryError::Io(crate::errors::IoError {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                })
            })
    };
    match crate::tree::receipt::read(&layout.receipts(), &rel) {
        Some(receipt) => {
            // Unchanged since apply verified it (same identity, as plan decides): no re-read of
            // a 100 MiB binary while the chain waits. Anything else is hashed before it may run.
            if !tree::receipt_holds(&layout.receipts(), &rel, &receipt, &meta) {
                let actual = hash(&path)?;
                if actual != receipt.sha256 {
                    return Err(BinaryError::Tampered {
                        path,
                        expected: receipt.sha256,
                        actual,
                    });
                }
            }
            if let Some((pins, pin)) = pin {
                let member_differs = match (&pin.path, &receipt.member) {
                    (Some(want), Some(got)) => {
                        want.trim_start_matches("./") != got.trim_start_matches("./")
                    }
                    _ => false,
                };
                if receipt.source_sha256 != pin.sha256 || member_differs {
                    return Err(BinaryError::NotPinned {
                        path,
                        manifest: pins.path.clone(),
                        platform: pins.platform.clone(),
                        found: format!(
                            "it was staged from {}{} (sha256 {})",
                            receipt.source_url,
                            receipt
                                .member
                                .map(|m| format!(" member {m}"))
                                .unwrap_or_default(),
                            receipt.source_sha256
                        ),
                        pin: Box::new(pin.clone()),
                    });
                }
            }
        }
        None => match pin {
            Some((pins, pin)) => {
                let actual = hash(&path)?;
                if actual != pin.sha256 {
                    if pin.path.is_some() || is_archive_url(&pin.url) {
                        // The pin is an archive's: these bytes cannot be proven without it.
                        warn!(
                            "{} has no cvx receipt and the manifest pins an archive for it: not verified by cvx (`cvx apply` verifies it)",
                            path.display()
                        );
                    } else {
                        return Err(BinaryError::NotPinned {
                            path,
                            manifest: pins.path.clone(),
                            platform: pins.platform.clone(),
                            found: format!("its sha256 is {actual} and cvx has no receipt for it"),
                            pin: Box::new(pin.clone()),
                        });
                    }
                }
            }
            None => warn!(
                "{} has no cvx receipt: staged by another tool, not verified by cvx",
                path.display()
            ),
        },
    }
    Ok(path)
}

fn is_archive_url(url: &str) -> bool {
    let name = crate::manifest::url_file_name(url).unwrap_or(url);
    crate::apply::unpack::kind_from_name(name).is_some()
}
