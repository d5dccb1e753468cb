//! The lab Ceph cluster of `cargo xtask lab ceph`, as tests use it: RBD images in pool `vms`
//! written and read with the admin key (never the key nasbak is meant to find by itself), the
//! network `<disk>` a domain reaches them with, and CephFS addresses and keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak_process::ExternalCommand;

use crate::STATE;

/// The lab cluster's directory (configuration, keyrings).
pub fn dir() -> PathBuf {
    Path::new(STATE).join("ceph")
}

/// The monitors' v1 addresses (what a `<host>` of a network disk and a CephFS kernel mount
/// name), `host:port`: three, in one quorum.
pub const MONITORS: &[&str] = &["127.0.0.1:6789", "127.0.0.1:6790", "127.0.0.1:6791"];
/// The libvirt secret's usage name, holding `client.nasbak-vm`'s key.
pub const SECRET_USAGE: &str = "nasbak-lab client.nasbak-vm";

fn conf() -> String {
    let conf = dir().join("ceph.conf");
    if !conf.exists() {
        panic!("the lab Ceph cluster is not set up ({} is missing); run `cargo xtask lab ceph`", conf.display());
    }
    conf.to_string_lossy().into_owned()
}

/// QEMU's filename of `pool/image` reached as the admin.
pub fn admin_filename(pool_image: &str) -> String {
    format!("rbd:{pool_image}:id=admin:conf={}:keyring={}", conf(), dir().join("client.admin.keyring").display())
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    ExternalCommand::new(program)
        .args(args)
        .timeout(Duration::from_secs(120))
        .run()
        .map(|o| o.stdout_text())
        .map_err(|e| e.to_string())
}

/// `rbd ARGS` as the admin.
pub fn rbd(args: &[&str]) -> Result<String, String> {
    let conf = conf();
    let mut all = vec!["-c", conf.as_str(), "--id", "admin"];
    all.extend_from_slice(args);
    run("rbd", &all)
}

/// Copies the raw file `raw` into a new image `vms/<image>`.
pub fn import(raw: &Path, image: &str) {
    let target = admin_filename(&format!("vms/{image}"));
    // `-n` needs the image: made first, of the file's size.
    let size = std::fs::metadata(raw).expect("the raw file").len();
    if !exists(&format!("vms/{image}")) {
        run("qemu-img", &["create", "-q", "-f", "raw", &target, &size.to_string()])
            .unwrap_or_else(|e| panic!("creating RBD image vms/{image}: {e}"));
    }
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &raw.to_string_lossy(), &target])
        .unwrap_or_else(|e| panic!("filling RBD image vms/{image}: {e}"));
}

/// Whether `pool/image` exists.
pub fn exists(pool_image: &str) -> bool {
    rbd(&["info", pool_image]).is_ok()
}

/// Removes `vms/<image>` if it is there.
pub fn remove(image: &str) {
    let _ = rbd(&["rm", "--no-progress", &format!("vms/{image}")]);
}

/// Copies `pool/image` to the raw file `raw` (to compare or read it).
pub fn export(pool_image: &str, raw: &Path) {
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &admin_filename(pool_image), &raw.to_string_lossy()])
        .unwrap_or_else(|e| panic!("reading RBD image {pool_image}: {e}"));
}

/// The network `<disk>` of `pool/image` at `target`: the lab monitors, `client.nasbak-vm`
/// through the lab's libvirt secret.
pub fn disk_xml(pool_image: &str, target: &str) -> String {
    let hosts: String = MONITORS
        .iter()
        .map(|m| {
            let (host, port) = m.rsplit_once(':').expect("host:port");
            format!("<host name='{host}' port='{port}'/>")
        })
        .collect();
    format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <auth username='nasbak-vm'><secret type='ceph' usage='{SECRET_USAGE}'/></auth>\
         <source protocol='rbd' name='{pool_image}'>{hosts}</source><target dev='{target}' bus='virtio'/></disk>"
    )
}

/// The key of `client.<user>` (base64), read from its lab keyring.
pub fn key(user: &str) -> String {
    let keyring = dir().join(format!("client.{user}.keyring"));
    let text = std::fs::read_to_string(&keyring).unwrap_or_else(|e| panic!("{}: {e}", keyring.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .unwrap_or_else(|| panic!("no key in {}", keyring.display()))
        .trim()
        .to_owned()
}
