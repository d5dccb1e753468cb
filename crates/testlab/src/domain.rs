//! Disposable libvirt domains booting the lab's test guest.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nasbak_process::ExternalCommand;

use crate::{PREFIX, STATE, URI, lab_missing};

/// Runs `virsh -c qemu:///system ARGS` with a 60 s timeout and returns stdout.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    ExternalCommand::new("virsh")
        .args(["-c", URI])
        .args(args)
        .timeout(Duration::from_secs(60))
        .run()
        .map(|o| o.stdout_text())
        .map_err(|e| e.to_string())
}

fn run(program: &str, args: &[&str]) -> String {
    ExternalCommand::new(program)
        .args(args)
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap_or_else(|e| panic!("{e}"))
        .stdout_text()
}

/// What a disk is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A qcow2 file.
    Qcow2,
    /// A raw file.
    Raw,
    /// A block device (a loop device over a raw file).
    Block,
    /// A read-only cdrom (a raw file on the IDE bus).
    Cdrom,
    /// An RBD image in the lab Ceph cluster's pool `vms` (`cargo xtask lab ceph`), a network
    /// disk reached as `client.nasbak-vm` through the lab's libvirt secret.
    Rbd,
}

/// One disk to create.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    kind: DiskKind,
    size_mib: u64,
    ext4: bool,
    files: Vec<(String, Vec<u8>)>,
    name: Option<String>,
    partitions: Vec<PartitionSpec>,
    bootable: bool,
}

/// A partition of a disk with a GPT partition table ([`DiskSpec::partitions`]).
#[derive(Debug, Clone)]
pub struct PartitionSpec {
    /// `ext4`, `xfs` (300 MiB at least), `btrfs` (120 MiB at least; a file named `SUBVOL/...`
    /// goes into the subvolume `SUBVOL`, made for it, and a subvolume named `@` becomes the
    /// default one, as openSUSE and Ubuntu lay out their root), `swap`, `lvm` (a physical volume,
    /// see [`PartitionSpec::lvm`]) or `none` (left blank).
    pub fstype: &'static str,
    /// Its size in MiB; 0 for the rest of the disk (last partition only).
    pub size_mib: u64,
    /// Files written at the file system's root.
    pub files: Vec<(String, Vec<u8>)>,
    /// For `lvm`: the volume group's name and its logical volumes, made in this order.
    pub lvm: Option<(String, Vec<LogicalVolumeSpec>)>,
}

/// A logical volume of an LVM partition ([`PartitionSpec::lvm`]).
#[derive(Debug, Clone)]
pub struct LogicalVolumeSpec {
    /// Its name.
    pub name: String,
    /// `ext4`, `xfs`, `swap` or `none`.
    pub fstype: &'static str,
    /// Its size in MiB.
    pub size_mib: u64,
    /// MiB added after every logical volume is made (`lvextend`): a second piece, elsewhere on
    /// the physical volume (such a volume is left unformatted).
    pub extend_mib: u64,
    /// Files written at the file system's root.
    pub files: Vec<(String, Vec<u8>)>,
}

impl LogicalVolumeSpec {
    /// A logical volume `name` of `size_mib` MiB formatted `fstype`, holding `files`.
    pub fn new(name: &str, fstype: &'static str, size_mib: u64, files: &[(&str, &[u8])]) -> Self {
        LogicalVolumeSpec {
            name: name.to_owned(),
            fstype,
            size_mib,
            extend_mib: 0,
            files: files.iter().map(|(n, c)| (n.to_string(), c.to_vec())).collect(),
        }
    }
    /// The same, extended by `mib` MiB once every logical volume is made (two pieces).
    pub fn extended(mut self, mib: u64) -> Self {
        self.extend_mib = mib;
        self
    }
}

impl PartitionSpec {
    /// A partition of `fstype` and `size_mib` MiB (0: the rest of the disk) holding `files`.
    pub fn new(fstype: &'static str, size_mib: u64, files: &[(&str, &[u8])]) -> Self {
        PartitionSpec {
            fstype,
            size_mib,
            files: files.iter().map(|(n, c)| (n.to_string(), c.to_vec())).collect(),
            lvm: None,
        }
    }
    /// An LVM physical volume of `size_mib` MiB holding the volume group `vg` with these
    /// logical volumes, as an installer makes one (RHEL's: `rhel` with `root` and `swap`). LVM's
    /// own tools write the metadata (nothing is activated: `--driverloaded n`); each file
    /// system is written at the offset LVM reports for its volume.
    pub fn lvm(size_mib: u64, vg: &str, lvs: Vec<LogicalVolumeSpec>) -> Self {
        PartitionSpec { fstype: "lvm", size_mib, files: Vec::new(), lvm: Some((vg.to_owned(), lvs)) }
    }
}

impl DiskSpec {
    fn new(kind: DiskKind, size_mib: u64) -> Self {
        DiskSpec { kind, size_mib, ext4: false, files: Vec::new(), name: None, partitions: Vec::new(), bootable: false }
    }
    /// Makes the disk boot the lab guest: an MBR with extlinux, an ext2 partition holding the
    /// lab kernel and initramfs (for a domain that boots from its disk,
    /// [`DomainSpec::boot_from_disk`]).
    pub fn bootable(mut self) -> Self {
        self.bootable = true;
        self
    }
    /// Gives the disk a GPT partition table with these partitions, formatted and filled.
    pub fn partitions(mut self, partitions: Vec<PartitionSpec>) -> Self {
        self.partitions = partitions;
        self
    }
    /// Puts a file disk (qcow2 or raw) at this path relative to the domain's directory
    /// (`a/data.qcow2`; directories are created), for layouts with odd names.
    pub fn named(mut self, relative: &str) -> Self {
        self.name = Some(relative.to_owned());
        self
    }
    /// A qcow2 disk of `size_mib` MiB.
    pub fn qcow2(size_mib: u64) -> Self {
        DiskSpec::new(DiskKind::Qcow2, size_mib)
    }
    /// A raw file disk.
    pub fn raw(size_mib: u64) -> Self {
        DiskSpec::new(DiskKind::Raw, size_mib)
    }
    /// A block device disk.
    pub fn block(size_mib: u64) -> Self {
        DiskSpec::new(DiskKind::Block, size_mib)
    }
    /// An RBD image of `size_mib` MiB in the lab cluster (see [`DiskKind::Rbd`]); its
    /// [`LabDisk::path`] is the raw file it was filled from, kept for comparisons.
    pub fn rbd(size_mib: u64) -> Self {
        DiskSpec::new(DiskKind::Rbd, size_mib)
    }
    /// A 1 MiB cdrom.
    pub fn cdrom() -> Self {
        DiskSpec::new(DiskKind::Cdrom, 1)
    }
    /// Formats the disk with ext4 (the guest mounts the first ext4 disk on `/data`).
    pub fn ext4(mut self) -> Self {
        self.ext4 = true;
        self
    }
    /// Formats with ext4 holding these files at its root.
    pub fn ext4_with_files(mut self, files: &[(&str, &[u8])]) -> Self {
        self.ext4 = true;
        self.files = files.iter().map(|(n, c)| (n.to_string(), c.to_vec())).collect();
        self
    }
}

/// A disk of a created domain.
#[derive(Debug, Clone)]
pub struct LabDisk {
    /// Target device in the guest (`vda`, `hdc`).
    pub target: String,
    /// The file or block device.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// What backs it.
    pub kind: DiskKind,
    /// `pool/image` of an RBD disk.
    pub rbd: Option<String>,
}

/// A domain to create.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    tag: String,
    disks: Vec<DiskSpec>,
    agent: bool,
    running: bool,
    acpi: bool,
    disk_boot: bool,
    uefi: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl DomainSpec {
    /// A domain whose name ends in `tag`, with no disks, no agent, shut off.
    pub fn new(tag: &str) -> Self {
        DomainSpec {
            tag: tag.to_owned(),
            disks: Vec::new(),
            agent: false,
            running: false,
            acpi: false,
            disk_boot: false,
            uefi: false,
        }
    }

    /// The tag the domain's name is made from.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// A UEFI machine (q35, OVMF with its variable store `nvram.fd` in the domain's directory,
    /// made by libvirt from OVMF's template at the first start; the lab kernel booted directly)
    /// with an emulated TPM 2.0 (swtpm, its state where libvirt keeps it). Needs Debian's
    /// `ovmf`, `swtpm` and `swtpm-tools`.
    pub fn uefi_with_tpm(mut self, yes: bool) -> Self {
        self.uefi = yes;
        self
    }
    /// Adds a disk.
    pub fn disk(mut self, disk: DiskSpec) -> Self {
        self.disks.push(disk);
        self
    }
    /// Whether the domain has a guest-agent channel.
    pub fn agent(mut self, agent: bool) -> Self {
        self.agent = agent;
        self
    }
    /// With ACPI, so that disks can be hot-plugged into the running domain (i440fx's PCI
    /// hotplug goes through ACPI; without it QEMU refuses `device_add` on `pci.0`).
    pub fn acpi(mut self, acpi: bool) -> Self {
        self.acpi = acpi;
        self
    }

    /// Boots from the first disk (made with [`DiskSpec::bootable`]) through the firmware, whose
    /// messages go to the serial console, rather than from the lab kernel directly.
    pub fn boot_from_disk(mut self, yes: bool) -> Self {
        self.disk_boot = yes;
        self
    }

    /// Whether the domain is started after it is defined (default: shut off).
    pub fn running(mut self, running: bool) -> Self {
        self.running = running;
        self
    }

    /// Creates the disks and defines (and maybe starts) the domain. Panics when the lab is not up.
    pub fn create(self) -> LabDomain {
        let guest = guest_paths();
        sweep_once();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{PREFIX}{}-{n}-{}", std::process::id(), self.tag);
        let dir = Path::new(STATE).join("run").join(&name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| lab_missing(&format!("cannot create {}: {e}", dir.display())));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod domain dir");
        let mut dom =
            LabDomain { name, dir, disks: Vec::new(), loops: Vec::new(), rbd_images: Vec::new(), defined: false };
        let mut vd = b'a';
        for (i, spec) in self.disks.iter().enumerate() {
            let disk = dom.make_disk(i, spec, &mut vd);
            dom.disks.push(disk);
        }
        let xml = dom.xml(&guest, self.agent, self.acpi || self.uefi, self.disk_boot);
        let xml = if self.uefi {
            swtpm_local_ca_to_tss().expect("giving swtpm's local CA to tss");
            uefi_xml(&xml, &dom.dir)
        } else {
            xml
        };
        let xml_path = dom.dir.join("domain.xml");
        fs::write(&xml_path, xml).expect("write domain xml");
        virsh(&["define", xml_path.to_str().expect("utf-8 path")])
            .unwrap_or_else(|e| panic!("defining {}: {e}", dom.name));
        dom.defined = true;
        if self.running {
            dom.start();
        }
        dom
    }
}

/// Writes the partition table `script` (sfdisk's input) to the disk file `raw`.
fn sfdisk(raw: &Path, script: &str) {
    let status = std::process::Command::new("sfdisk")
        .arg("-q")
        .arg(raw)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            std::io::Write::write_all(c.stdin.as_mut().expect("piped"), script.as_bytes())?;
            drop(c.stdin.take());
            c.wait()
        })
        .unwrap_or_else(|e| lab_missing(&format!("sfdisk (package fdisk): {e}")));
    assert!(status.success(), "sfdisk failed on {}", raw.display());
}

fn guest_paths() -> (String, String) {
    let conf = fs::read_to_string(Path::new(STATE).join("guest.conf"))
        .unwrap_or_else(|_| lab_missing(&format!("{STATE}/guest.conf is missing (no test guest built)")));
    let get = |key: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .unwrap_or_else(|| lab_missing(&format!("{STATE}/guest.conf has no {key}")))
    };
    if virsh(&["version"]).is_err() {
        lab_missing(&format!("libvirtd does not answer on {URI}"));
    }
    (get("kernel"), get("initrd"))
}

/// A libvirt domain that is destroyed and undefined, with its files and loop devices, on drop.
#[derive(Debug)]
pub struct LabDomain {
    name: String,
    dir: PathBuf,
    disks: Vec<LabDisk>,
    loops: Vec<String>,
    rbd_images: Vec<String>,
    defined: bool,
}

impl LabDomain {
    fn make_disk(&mut self, i: usize, spec: &DiskSpec, vd: &mut u8) -> LabDisk {
        let raw = self.dir.join(format!("disk{i}.raw"));
        let f = fs::File::create(&raw).expect("create disk file");
        f.set_len(spec.size_mib << 20).expect("size disk file");
        drop(f);
        if spec.ext4 {
            // No lazy initialisation: an idle guest must not keep writing to the disk in the
            // background, or a backup could never equal its source.
            let mut args = vec!["-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0"];
            let content = self.dir.join(format!("disk{i}.content"));
            if !spec.files.is_empty() {
                fs::create_dir_all(&content).expect("content dir");
                for (name, data) in &spec.files {
                    fs::write(content.join(name), data).expect("write content file");
                }
                args.extend(["-d", content.to_str().expect("utf-8")]);
            }
            args.push(raw.to_str().expect("utf-8"));
            run("mkfs.ext4", &args);
            let _ = fs::remove_dir_all(&content);
        }
        if !spec.partitions.is_empty() {
            self.partition(&raw, &spec.partitions);
        }
        if spec.bootable {
            self.make_bootable(&raw);
        }
        let (target, path, format) = match spec.kind {
            DiskKind::Qcow2 => {
                let q = self.dir.join(format!("disk{i}.qcow2"));
                run(
                    "qemu-img",
                    &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().expect("utf-8"), q.to_str().expect("utf-8")],
                );
                fs::remove_file(&raw).expect("remove raw");
                (next_vd(vd), q, "qcow2")
            }
            DiskKind::Raw => (next_vd(vd), raw, "raw"),
            DiskKind::Block => {
                let dev = run("losetup", &["--find", "--show", raw.to_str().expect("utf-8")]).trim().to_owned();
                self.loops.push(dev.clone());
                (next_vd(vd), PathBuf::from(dev), "raw")
            }
            DiskKind::Cdrom => ("hdc".to_owned(), raw, "raw"),
            DiskKind::Rbd => {
                let image = format!("{}-disk{i}", self.name);
                crate::ceph::import(&raw, &image);
                self.rbd_images.push(image);
                (next_vd(vd), raw, "raw")
            }
        };
        let path = match (&spec.name, spec.kind) {
            (Some(name), DiskKind::Qcow2 | DiskKind::Raw) => {
                let named = self.dir.join(name);
                fs::create_dir_all(named.parent().expect("a file in the domain directory")).expect("disk dir");
                fs::rename(&path, &named).expect("rename disk");
                named
            }
            _ => path,
        };
        let rbd = (spec.kind == DiskKind::Rbd).then(|| format!("vms/{}-disk{i}", self.name));
        LabDisk { target, path, format, kind: spec.kind, rbd }
    }

    /// An MBR with extlinux's boot code and one active ext2 partition holding the lab kernel,
    /// initramfs and an extlinux configuration that boots them with the console on ttyS0.
    fn make_bootable(&self, raw: &Path) {
        let (kernel, initrd) = guest_paths();
        sfdisk(raw, "label: dos\n,,L,*\n");
        let dev = run("losetup", &["--find", "--show", "--partscan", raw.to_str().expect("utf-8")]).trim().to_owned();
        let _ = ExternalCommand::new("partx").args(["-u", &dev]).timeout(Duration::from_secs(30)).run();
        let part = format!("{dev}p1");
        run("mkfs.ext2", &["-q", "-F", &part]);
        let mnt = self.dir.join("boot.mnt");
        fs::create_dir_all(&mnt).expect("mount dir");
        let m = mnt.to_str().expect("utf-8");
        run("mount", &[&part, m]);
        fs::copy(&kernel, mnt.join("vmlinuz")).expect("copy the kernel");
        fs::copy(&initrd, mnt.join("initrd.img")).expect("copy the initramfs");
        fs::write(
            mnt.join("extlinux.conf"),
            "DEFAULT lab\nPROMPT 0\nTIMEOUT 0\nLABEL lab\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND console=ttyS0\n",
        )
        .expect("extlinux.conf");
        let installed = ExternalCommand::new("extlinux").args(["--install", m]).timeout(Duration::from_secs(60)).run();
        run("umount", &[m]);
        let _ = fs::remove_dir(&mnt);
        let _ = ExternalCommand::new("partx").args(["-d", &dev]).timeout(Duration::from_secs(30)).run();
        run("losetup", &["-d", &dev]);
        installed.unwrap_or_else(|e| lab_missing(&format!("extlinux (package extlinux): {e}")));
        let mbr = fs::read("/usr/lib/EXTLINUX/mbr.bin")
            .unwrap_or_else(|e| lab_missing(&format!("/usr/lib/EXTLINUX/mbr.bin (package extlinux): {e}")));
        let f = fs::OpenOptions::new().write(true).open(raw).expect("open the disk");
        std::os::unix::fs::FileExt::write_all_at(&f, &mbr[..mbr.len().min(440)], 0).expect("write the boot code");
    }

    /// Writes a GPT with `parts` to the raw file, then formats and fills each partition through
    /// a loop device (its partitions added with partx: nothing here runs udev).
    fn partition(&self, raw: &Path, parts: &[PartitionSpec]) {
        let mut script = String::from("label: gpt\n");
        for p in parts {
            script.push_str(&if p.size_mib == 0 { ",\n".to_owned() } else { format!(",{}M\n", p.size_mib) });
        }
        sfdisk(raw, &script);
        let dev = run("losetup", &["--find", "--show", "--partscan", raw.to_str().expect("utf-8")]).trim().to_owned();
        let _ = ExternalCommand::new("partx").args(["-u", &dev]).timeout(Duration::from_secs(30)).run();
        let mnt = self.dir.join("partition.mnt");
        fs::create_dir_all(&mnt).expect("mount dir");
        for (i, p) in parts.iter().enumerate() {
            let part = format!("{dev}p{}", i + 1);
            match p.fstype {
                "ext4" => run("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", &part]),
                "xfs" => run("mkfs.xfs", &["-q", "-f", &part]),
                "btrfs" => run("mkfs.btrfs", &["-q", "-f", &part]),
                "swap" => run("mkswap", &[&part]),
                "lvm" => {
                    let (vg, lvs) = p.lvm.as_ref().expect("an lvm partition has its volumes");
                    self.volume_group(raw, &part, vg, lvs);
                    String::new()
                }
                _ => String::new(),
            };
            if !p.files.is_empty() {
                run("mount", &[&part, mnt.to_str().expect("utf-8")]);
                for (name, data) in &p.files {
                    if let Some((sub, _)) = name.split_once('/').filter(|_| p.fstype == "btrfs")
                        && !mnt.join(sub).exists()
                    {
                        run("btrfs", &["subvolume", "create", mnt.join(sub).to_str().expect("utf-8")]);
                    }
                    fs::write(mnt.join(name), data).expect("write a file into a partition");
                }
                if p.fstype == "btrfs" && mnt.join("@").exists() {
                    run("btrfs", &["subvolume", "set-default", mnt.join("@").to_str().expect("utf-8")]);
                }
                run("umount", &[mnt.to_str().expect("utf-8")]);
            }
        }
        let _ = fs::remove_dir(&mnt);
        let _ = ExternalCommand::new("partx").args(["-d", &dev]).timeout(Duration::from_secs(30)).run();
        run("losetup", &["-d", &dev]);
    }

    /// Makes the volume group `vg` with `lvs` on the partition device `part` of the disk file
    /// `raw`, and formats and fills each single-piece volume through a loop device at the offset
    /// LVM itself reports (`pvs` and `lvs`): nothing is activated, nothing is left on the host.
    fn volume_group(&self, raw: &Path, part: &str, vg: &str, lvs: &[LogicalVolumeSpec]) {
        let config =
            format!("devices {{ filter = [ \"a|^{part}$|\", \"r|.*|\" ] }} backup {{ backup = 0 archive = 0 }}");
        let lvm = |args: &[&str]| -> String {
            let mut all: Vec<&str> = args.to_vec();
            all.extend(["--config", &config]);
            run(all[0], &all[1..])
        };
        lvm(&["pvcreate", "-q", "-y", part]);
        lvm(&["vgcreate", "-q", "-s", "4m", vg, part]);
        for lv in lvs {
            let size = format!("{}m", lv.size_mib);
            lvm(&["lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-L", &size, "-n", &lv.name, vg]);
        }
        for lv in lvs.iter().filter(|l| l.extend_mib > 0) {
            let more = format!("+{}m", lv.extend_mib);
            lvm(&["lvextend", "-q", "--driverloaded", "n", "-L", &more, &format!("{vg}/{}", lv.name)]);
        }
        // Where the partition starts in the disk file, and where each volume starts in it.
        let start: u64 = fs::read_to_string(format!(
            "/sys/class/block/{}/start",
            Path::new(part).file_name().and_then(|n| n.to_str()).expect("a partition device name")
        ))
        .expect("the partition's start")
        .trim()
        .parse::<u64>()
        .expect("a sector number")
            * 512;
        let pe_start: u64 = lvm(&["pvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "pe_start", part])
            .trim()
            .parse()
            .expect("pe_start");
        let mnt = self.dir.join("lv.mnt");
        fs::create_dir_all(&mnt).expect("mount dir");
        for lv in lvs.iter().filter(|l| l.extend_mib == 0 && l.fstype != "none") {
            let ranges = lvm(&["lvs", "--noheadings", "-o", "seg_pe_ranges", &format!("{vg}/{}", lv.name)]);
            let first: u64 = ranges
                .trim()
                .rsplit(':')
                .next()
                .and_then(|r| r.split('-').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("the extents of {}: {ranges}", lv.name));
            let offset = start + pe_start + first * (4 << 20);
            let dev = run(
                "losetup",
                &[
                    "--find",
                    "--show",
                    "--offset",
                    &offset.to_string(),
                    "--sizelimit",
                    &(lv.size_mib << 20).to_string(),
                    raw.to_str().expect("utf-8"),
                ],
            )
            .trim()
            .to_owned();
            match lv.fstype {
                "ext4" => run("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", &dev]),
                "xfs" => run("mkfs.xfs", &["-q", "-f", &dev]),
                "swap" => run("mkswap", &[&dev]),
                other => panic!("a logical volume formatted {other}"),
            };
            if !lv.files.is_empty() {
                run("mount", &[&dev, mnt.to_str().expect("utf-8")]);
                for (name, data) in &lv.files {
                    fs::write(mnt.join(name), data).expect("write a file into a logical volume");
                }
                run("umount", &[mnt.to_str().expect("utf-8")]);
            }
            run("losetup", &["-d", &dev]);
        }
        let _ = fs::remove_dir(&mnt);
    }

    fn xml(&self, (kernel, initrd): &(String, String), agent: bool, acpi: bool, disk_boot: bool) -> String {
        let mut x = String::new();
        let os = if disk_boot {
            "<boot dev='hd'/><bios useserial='yes'/>".to_owned()
        } else {
            format!("<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0</cmdline>")
        };
        let _ = write!(
            x,
            "<domain type='qemu'>\n  <name>{}</name>\n  <memory unit='MiB'>256</memory>\n  <vcpu>1</vcpu>\n  \
             <os><type arch='x86_64'>hvm</type>{os}</os>\n  \
             {}<on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  <devices>\n",
            self.name,
            if acpi { "<features><acpi/></features>\n  " } else { "" }
        );
        for d in &self.disks {
            let (ty, src, device, bus, ro) = match d.kind {
                DiskKind::Block => ("block", format!("dev='{}'", d.path.display()), "disk", "virtio", ""),
                DiskKind::Cdrom => ("file", format!("file='{}'", d.path.display()), "cdrom", "ide", "<readonly/>"),
                DiskKind::Rbd => {
                    let _ =
                        writeln!(x, "    {}", crate::ceph::disk_xml(d.rbd.as_deref().unwrap_or_default(), &d.target));
                    continue;
                }
                _ => ("file", format!("file='{}'", d.path.display()), "disk", "virtio", ""),
            };
            let _ = writeln!(
                x,
                "    <disk type='{ty}' device='{device}'><driver name='qemu' type='{}'/><source {src}/><target dev='{}' bus='{bus}'/>{ro}</disk>",
                d.format, d.target
            );
        }
        if agent {
            x.push_str("    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n");
        }
        let _ = write!(
            x,
            "    <serial type='file'><source path='{}'/><target port='0'/></serial>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
            self.console_log().display()
        );
        x
    }

    /// The domain name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The directory holding its disk files and console log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Its disks, in the order given.
    pub fn disks(&self) -> &[LabDisk] {
        &self.disks
    }
    /// The guest's serial console, captured to a file.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Starts the domain.
    pub fn start(&self) {
        virsh(&["start", &self.name]).unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
    }

    /// Powers the domain off at once.
    pub fn destroy(&self) {
        let _ = virsh(&["destroy", &self.name]);
    }

    /// Kills the domain's QEMU with SIGKILL, as a host crash would (nothing flushed, persistent
    /// bitmaps not stored), and waits until libvirt sees it shut off.
    pub fn crash(&self) {
        let pid = qemu_pid(&self.name);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill QEMU");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.is_running() {
            assert!(Instant::now() < deadline, "{} still runs 30 s after its QEMU was killed", self.name);
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the domain's QEMU (SIGSTOP): a QEMU whose monitor and guest agent never answer, as
    /// one stuck on a stalled NAS. It runs again (SIGCONT) when the guard drops, also when the
    /// test panics.
    pub fn freeze_qemu(&self) -> FrozenQemu {
        FrozenQemu::of(&self.name)
    }

    /// Waits until libvirt shows a backup job running on the domain; panics after `timeout`.
    pub fn wait_for_backup_job(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let info = virsh(&["domjobinfo", &self.name]).unwrap_or_default();
            if info.contains("Backup") || info.contains("Unbounded") || info.contains("Bounded") {
                return;
            }
            assert!(Instant::now() < deadline, "no backup job started on {} in {timeout:?}", self.name);
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes `pattern` over `len` bytes at `offset` (qemu-io sizes: `4M`) of the running
    /// domain's disk `index` through QEMU's block layer (HMP `qemu-io`): what a guest write does,
    /// dirty bitmaps included, without a guest OS.
    pub fn write_through_qemu(&self, index: usize, pattern: u8, offset: &str, len: &str) {
        // Through the guest's own device (its qdev path), not a second user of the node, which
        // the device's unshared write permission would refuse.
        // An RBD disk is found in QEMU's block list by its image's name.
        let disk = &self.disks[index];
        let device = match disk.rbd.as_deref().and_then(|r| r.rsplit('/').next()) {
            Some(image) => self.qdev(Path::new(image)),
            None => self.qdev(&disk.path),
        };
        let command = format!("qemu-io -d {device} \"write -P {pattern:#x} {offset} {len}\"");
        let out = virsh(&["qemu-monitor-command", &self.name, "--hmp", &command]).expect("qemu-io");
        // HMP answers nothing when the write went through (its report goes to QEMU's own
        // output), and the reason when it did not (a permission conflict, a bad offset).
        assert!(out.trim().is_empty(), "{command}: {out}");
    }

    /// Writes `pattern` over `len` bytes at `offset` (qemu-io sizes) of the shut-off domain's
    /// qcow2 disk `index` with `qemu-io`, through QEMU's block layer as the VM would: its
    /// persistent bitmaps record the write.
    pub fn write_offline(&self, index: usize, pattern: u8, offset: &str, len: &str) {
        let disk = &self.disks[index];
        run(
            "qemu-io",
            &[
                "-f",
                disk.format,
                "-c",
                &format!("write -P {pattern:#x} {offset} {len}"),
                disk.path.to_str().expect("utf-8"),
            ],
        );
    }

    /// The persistent bitmaps of the shut-off domain's disk `index`, as `(name, flags)` from
    /// `qemu-img info`.
    pub fn stored_bitmaps(&self, index: usize) -> Vec<(String, Vec<String>)> {
        let out = run("qemu-img", &["info", "-U", "--output=json", self.disks[index].path.to_str().expect("utf-8")]);
        let info: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info JSON");
        let mut bitmaps: Vec<(String, Vec<String>)> = info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| {
                let flags = b["flags"].as_array().cloned().unwrap_or_default();
                (
                    b["name"].as_str().unwrap_or_default().to_owned(),
                    flags.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect(),
                )
            })
            .collect();
        bitmaps.sort();
        bitmaps
    }

    /// The qdev path of the device the running domain's disk image at `path` is attached to
    /// (`/machine/peripheral/virtio-disk0/virtio-backend`), from HMP `info block`.
    fn qdev(&self, path: &Path) -> String {
        let disk = path.to_string_lossy().into_owned();
        let info = virsh(&["qemu-monitor-command", &self.name, "--hmp", "info block"]).expect("info block");
        info.lines()
            .skip_while(|l| !l.contains(&disk))
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .find_map(|l| l.trim().strip_prefix("Attached to:"))
            .map(|d| d.trim().to_owned())
            .unwrap_or_else(|| panic!("no device for {disk} in {info}"))
    }

    /// QEMU's block node name of the running domain's disk image at `path`.
    fn block_node(&self, path: &Path) -> String {
        let disk = path.to_string_lossy().into_owned();
        let info = virsh(&["qemu-monitor-command", &self.name, "--hmp", "info block"]).expect("info block");
        info.lines()
            .find(|l| l.contains(&disk))
            .and_then(|l| l.split(':').next())
            .unwrap_or_else(|| panic!("no block node for {disk} in {info}"))
            .trim()
            .to_owned()
    }

    /// Writes `pattern` over `len` bytes at `offset` of the running guest's disk `/dev/<target>`
    /// from inside the guest, through its guest agent (`guest-file-open` of the block device,
    /// seek, write in chunks, flush, close): data a guest writes, through the guest's kernel.
    /// The domain needs an agent.
    pub fn write_through_agent(&self, target: &str, pattern: u8, offset: u64, len: u64) {
        use base64::Engine as _;
        let reply = |json: &str| -> serde_json::Value {
            let text = self.agent_command(json);
            serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{json}: {e}: {text}"))["return"]
                .clone()
        };
        let handle =
            reply(&format!(r#"{{"execute":"guest-file-open","arguments":{{"path":"/dev/{target}","mode":"r+"}}}}"#));
        let handle = handle.as_i64().unwrap_or_else(|| panic!("guest-file-open of /dev/{target}: {handle}"));
        reply(&format!(
            r#"{{"execute":"guest-file-seek","arguments":{{"handle":{handle},"offset":{offset},"whence":"set"}}}}"#
        ));
        // One argument of virsh stays well under the kernel's 128 KiB limit.
        const CHUNK: u64 = 64 << 10;
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            let data = base64::engine::general_purpose::STANDARD.encode(vec![pattern; n as usize]);
            let written = reply(&format!(
                r#"{{"execute":"guest-file-write","arguments":{{"handle":{handle},"buf-b64":"{data}"}}}}"#
            ));
            assert_eq!(written["count"].as_u64(), Some(n), "guest-file-write: {written}");
            done += n;
        }
        reply(&format!(r#"{{"execute":"guest-file-flush","arguments":{{"handle":{handle}}}}}"#));
        reply(&format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{handle}}}}}"#));
    }

    /// Removes the persistent dirty bitmap `name` from the running domain's disk `index` (QMP
    /// `block-dirty-bitmap-remove`), as a crash or another tool could lose it.
    pub fn remove_bitmap(&self, index: usize, name: &str) {
        let node = self.block_node(&self.disks[index].path);
        let command =
            format!(r#"{{"execute":"block-dirty-bitmap-remove","arguments":{{"node":"{node}","name":"{name}"}}}}"#);
        let out = virsh(&["qemu-monitor-command", &self.name, &command]).expect("block-dirty-bitmap-remove");
        assert!(!out.contains("error"), "{command}: {out}");
    }

    /// The names of the dirty bitmaps on the running domain's disk `index` (its image's node).
    pub fn bitmaps(&self, index: usize) -> Vec<String> {
        let node = self.block_node(&self.disks[index].path);
        let command = r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#;
        let out = virsh(&["qemu-monitor-command", &self.name, command]).expect("query-named-block-nodes");
        let nodes: serde_json::Value = serde_json::from_str(&out).expect("QMP reply");
        let mut names: Vec<String> = nodes["return"]
            .as_array()
            .expect("a list of nodes")
            .iter()
            .filter(|n| n["node-name"] == node.as_str())
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    }

    /// Grows the running domain's disk `index` to `size_mib` MiB (`virsh blockresize`).
    pub fn resize(&self, index: usize, size_mib: u64) {
        let target = &self.disks[index].target;
        virsh(&["blockresize", &self.name, target, &format!("{size_mib}M")]).expect("blockresize");
    }

    /// Creates a qcow2 disk of `size_mib` MiB and attaches it to the running domain as
    /// `target`, live and in its persistent definition.
    pub fn attach_qcow2(&mut self, target: &str, size_mib: u64) {
        let path = self.dir.join(format!("{target}-added.qcow2"));
        run("qemu-img", &["create", "-q", "-f", "qcow2", path.to_str().expect("utf-8"), &format!("{size_mib}M")]);
        let path_text = path.to_str().expect("utf-8");
        virsh(&[
            "attach-disk",
            &self.name,
            path_text,
            target,
            "--driver",
            "qemu",
            "--subdriver",
            "qcow2",
            "--targetbus",
            "virtio",
            "--live",
            "--config",
        ])
        .expect("attach-disk");
        self.disks.push(LabDisk { target: target.to_owned(), path, format: "qcow2", kind: DiskKind::Qcow2, rbd: None });
    }

    /// Disk `index` as it is now, copied to `<dir>/<name>.raw` (read with shared locks while
    /// QEMU runs): the content a backup of this moment must give back.
    pub fn raw_copy(&self, index: usize, name: &str) -> PathBuf {
        let raw = self.dir.join(format!("{name}.raw"));
        if self.is_running() {
            // What the guest wrote may still sit in QEMU's image caches (a guest's write-back
            // to its block device sends no flush): written to the file first.
            let node = self.block_node(&self.disks[index].path);
            let command = format!("qemu-io {node} flush");
            virsh(&["qemu-monitor-command", &self.name, "--hmp", &command]).expect("qemu-io flush");
        }
        ExternalCommand::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(&self.disks[index].path)
            .arg(&raw)
            .run()
            .expect("qemu-img convert");
        raw
    }

    /// A file's content in the ext4 file system on a disk image (any format qemu-img reads),
    /// if the file system and the file are there.
    pub fn read_ext4_file(&self, image: &Path, name: &str) -> Option<String> {
        let raw = self.dir.join("read.raw");
        ExternalCommand::new("qemu-img").args(["convert", "-O", "raw"]).arg(image).arg(&raw).run().expect("convert");
        let out = ExternalCommand::new("debugfs")
            .args(["-R", &format!("cat /{name}")])
            .arg(&raw)
            .run_unchecked()
            .expect("debugfs");
        let _ = fs::remove_file(&raw);
        let text = out.stdout_text();
        (out.status.success() && !text.is_empty()).then_some(text)
    }

    /// Whether the domain is running.
    pub fn is_running(&self) -> bool {
        virsh(&["domstate", &self.name]).is_ok_and(|s| s.trim() == "running")
    }

    /// Sends one guest-agent command (JSON) and returns the reply, trimmed. Panics on failure.
    pub fn agent_command(&self, json: &str) -> String {
        self.try_agent_command(json).unwrap_or_else(|e| panic!("agent command {json} on {}: {e}", self.name))
    }

    /// Sends one guest-agent command, waiting at most 5 s for the agent.
    pub fn try_agent_command(&self, json: &str) -> Result<String, String> {
        virsh(&["qemu-agent-command", &self.name, "--timeout", "5", json]).map(|s| s.trim().to_owned())
    }

    /// Waits until the guest agent answers a ping; panics with the console log after `timeout`.
    pub fn wait_for_agent(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.try_agent_command(r#"{"execute":"guest-ping"}"#).is_err() {
            if Instant::now() > deadline {
                let console = fs::read_to_string(self.console_log()).unwrap_or_default();
                panic!("the guest agent of {} did not answer within {timeout:?}; console:\n{console}", self.name);
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

fn next_vd(vd: &mut u8) -> String {
    let t = format!("vd{}", *vd as char);
    *vd += 1;
    t
}

impl Drop for LabDomain {
    fn drop(&mut self) {
        remove_domain(&self.name, self.defined);
        for dev in &self.loops {
            let _ = ExternalCommand::new("losetup").args(["-d", dev]).timeout(Duration::from_secs(30)).run();
        }
        for image in &self.rbd_images {
            crate::ceph::remove(image);
        }
        release_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What a test that failed half-way may have left under `dir`: file systems mounted there
/// (detached, deepest first), processes serving files there (qemu-storage-daemon exports,
/// killed), loop devices over its files (detached).
fn release_under(dir: &Path) {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    for pid in crate::ssh::pids_with_cmdline(dir.to_str().unwrap_or("/nonexistent")) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    detach_loops_under(dir);
}

fn remove_domain(name: &str, defined: bool) {
    let _ = virsh(&["destroy", name]);
    if defined {
        let _ = virsh(&["undefine", name, "--checkpoints-metadata", "--snapshots-metadata", "--nvram"]);
    }
}

fn sweep_once() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(sweep_leftovers);
}

/// swtpm's local certificate authority (`/var/lib/swtpm-localca`, which `swtpm_setup` uses when
/// libvirt first starts a domain with an emulated TPM) given to `tss`, whom libvirt runs swtpm
/// as. A libvirtd started before `tss` existed runs swtpm as root, and once libvirtd restarts
/// (the fault matrix restarts it) swtpm as `tss` cannot use root's files there ("Need
/// read/write rights on .../.lock.swtpm-localca"). Nothing to do without `tss` or the directory.
pub fn swtpm_local_ca_to_tss() -> std::io::Result<()> {
    let dir = Path::new("/var/lib/swtpm-localca");
    let Some(tss) = nix::unistd::User::from_name("tss").ok().flatten() else { return Ok(()) };
    if !dir.is_dir() {
        return Ok(());
    }
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(fs::read_dir(dir)?.flatten().map(|e| e.path()));
    for p in paths {
        std::os::unix::fs::chown(&p, Some(tss.uid.as_raw()), None)?;
    }
    Ok(())
}

/// `xml` made a UEFI machine with an emulated TPM (see [`DomainSpec::uefi_with_tpm`]).
fn uefi_xml(xml: &str, dir: &Path) -> String {
    xml.replace(
        "<type arch='x86_64'>hvm</type>",
        &format!(
            "<type arch='x86_64' machine='q35'>hvm</type>\
         <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\
         <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{}</nvram>",
            dir.join("nvram.fd").display()
        ),
    )
    .replace("  </devices>", "    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n  </devices>")
}

/// Removes test domains (and their files and loop devices) left by test processes that no
/// longer exist.
pub fn sweep_leftovers() {
    let Ok(list) = virsh(&["list", "--all", "--name"]) else { return };
    for name in list.lines().map(str::trim).filter(|n| n.starts_with(PREFIX)) {
        let pid = name[PREFIX.len()..].split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if alive {
            continue;
        }
        remove_domain(name, true);
        let dir = Path::new(STATE).join("run").join(name);
        release_under(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
    release_dead_origins();
    if let Ok(entries) = fs::read_dir(Path::new(STATE).join("run")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead_test_in(&format!("/{name}")) {
                release_under(&entry.path());
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Whether `origin` (a path, an sshfs source) lies in the run directory of a test process that
/// no longer exists: `.../nasbak-t-<pid>-...` with no `/proc/<pid>`.
fn dead_test_in(origin: &str) -> bool {
    let needle = format!("/{PREFIX}");
    origin.match_indices(&needle).any(|(at, _)| {
        let pid = origin[at + needle.len()..].split('-').next().and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
    })
}

/// Mounts anywhere (a repository's mount point under /run/nasbak/mnt, say) whose file system
/// comes from a dead test's files: a loop device over one of its images (even deleted), a bind
/// mount of one of its directories, an sshfs of one of its shares. A killed test run leaves
/// these behind where its own directory's sweep cannot see them, and the next run's repository
/// of the same name would find its mount point taken. Then the loop devices over such files.
fn release_dead_origins() {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut targets: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(root), Some(target)) = (fields.get(3), fields.get(4)) else { continue };
        let source = fields.iter().position(|f| *f == "-").and_then(|i| fields.get(i + 2)).copied().unwrap_or("");
        let origin = match source.strip_prefix("/dev/") {
            Some(dev) if dev.starts_with("loop") => {
                fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file")).unwrap_or_default()
            }
            _ => format!("{source} {root}"),
        };
        if dead_test_in(&origin.replace("\\040", " ")) {
            targets.push(PathBuf::from(target.replace("\\040", " ")));
        }
    }
    targets.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in targets {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    detach_loops(dead_test_in);
}

fn detach_loops_under(dir: &Path) {
    detach_loops(|file| Path::new(file).starts_with(dir));
}

/// Detaches every loop device whose backing file (as `losetup` shows it) `doomed` says.
fn detach_loops(doomed: impl Fn(&str) -> bool) {
    let Ok(out) = ExternalCommand::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .timeout(Duration::from_secs(30))
        .run()
    else {
        return;
    };
    for line in out.stdout_text().lines() {
        if let Some((dev, file)) = line.trim().split_once(' ')
            && doomed(file.trim())
        {
            let _ = ExternalCommand::new("losetup").args(["-d", dev]).timeout(Duration::from_secs(30)).run();
        }
    }
}

static SHARED: OnceLock<LabDomain> = OnceLock::new();

extern "C" fn remove_shared_at_exit() {
    if let Some(dom) = SHARED.get() {
        remove_domain(&dom.name, true);
        let _ = fs::remove_dir_all(&dom.dir);
    }
}

/// A running guest with a guest agent and an ext4 data disk (`vda`, mounted on `/data` in the
/// guest), booted once per test process and removed when the process exits. Tests that use it
/// must leave it as they found it (thawed, running).
pub fn shared_agent_guest() -> &'static LabDomain {
    SHARED.get_or_init(|| {
        let dom = DomainSpec::new("shared").disk(DiskSpec::qcow2(64).ext4()).agent(true).running(true).create();
        // SAFETY: `remove_shared_at_exit` is an `extern "C" fn()` with no arguments that only
        // reads a OnceLock and runs commands; atexit accepts exactly such a function pointer.
        unsafe {
            libc::atexit(remove_shared_at_exit);
        }
        dom.wait_for_agent(Duration::from_secs(90));
        dom
    })
}

/// The pid of the running domain `name`'s QEMU (libvirt's pid file).
pub fn qemu_pid(name: &str) -> nix::unistd::Pid {
    let pid_file = Path::new("/run/libvirt/qemu").join(format!("{name}.pid"));
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .expect("a pid");
    nix::unistd::Pid::from_raw(pid)
}

/// A domain's QEMU stopped with SIGSTOP ([`LabDomain::freeze_qemu`]); SIGCONT on drop.
#[derive(Debug)]
pub struct FrozenQemu {
    pid: nix::unistd::Pid,
}

impl FrozenQemu {
    /// Stops the QEMU of the running domain `name` (a lab domain, or a throwaway one nasbak
    /// started).
    pub fn of(name: &str) -> FrozenQemu {
        let pid = qemu_pid(name);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP QEMU");
        FrozenQemu { pid }
    }

    /// Lets QEMU run again now.
    pub fn thaw(self) {}
}

impl Drop for FrozenQemu {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGCONT);
    }
}
