//! The QEMU guest-agent commands nasbak uses, and their replies.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

/// A guest-agent command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    /// `guest-ping`.
    Ping,
    /// `guest-fsfreeze-freeze`: every freezable file system.
    Freeze,
    /// `guest-fsfreeze-freeze-list`: only these mount points.
    FreezeList(Vec<String>),
    /// `guest-fsfreeze-thaw`.
    Thaw,
    /// `guest-fsfreeze-status`.
    Status,
    /// `guest-get-fsinfo`.
    FsInfo,
    /// `guest-exec`: runs a program in the guest (its output captured).
    Exec {
        /// The program's path in the guest.
        path: String,
        /// Its arguments.
        args: Vec<String>,
    },
    /// `guest-exec-status` of a program `guest-exec` started.
    ExecStatus(i64),
}

impl AgentCommand {
    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            AgentCommand::Ping => "guest-ping",
            AgentCommand::Freeze => "guest-fsfreeze-freeze",
            AgentCommand::FreezeList(_) => "guest-fsfreeze-freeze-list",
            AgentCommand::Thaw => "guest-fsfreeze-thaw",
            AgentCommand::Status => "guest-fsfreeze-status",
            AgentCommand::FsInfo => "guest-get-fsinfo",
            AgentCommand::Exec { .. } => "guest-exec",
            AgentCommand::ExecStatus(_) => "guest-exec-status",
        }
    }

    /// The JSON sent to the agent.
    pub fn to_json(&self) -> String {
        match self {
            AgentCommand::FreezeList(points) => {
                json!({"execute": self.name(), "arguments": {"mountpoints": points}}).to_string()
            }
            AgentCommand::Exec { path, args } => json!({
                "execute": self.name(),
                "arguments": {"path": path, "arg": args, "capture-output": true}
            })
            .to_string(),
            AgentCommand::ExecStatus(pid) => json!({"execute": self.name(), "arguments": {"pid": pid}}).to_string(),
            _ => json!({"execute": self.name()}).to_string(),
        }
    }
}

/// The reply of `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExecStarted {
    /// The program's pid in the guest.
    pub pid: i64,
}

/// The reply of `guest-exec-status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ExecStatus {
    /// Whether the program has ended.
    pub exited: bool,
    /// Its exit code, once it has ended normally.
    #[serde(default)]
    pub exitcode: Option<i32>,
    /// The signal that ended it.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Its standard output, base64.
    #[serde(default, rename = "out-data")]
    pub out_data: Option<String>,
    /// Its standard error, base64.
    #[serde(default, rename = "err-data")]
    pub err_data: Option<String>,
}

/// The freeze state the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    /// Nothing frozen.
    Thawed,
    /// File systems frozen.
    Frozen,
}

/// One guest file system, from `guest-get-fsinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FsInfo {
    /// The device name in the guest (`vda`).
    pub name: String,
    /// Where it is mounted.
    pub mountpoint: String,
    /// The file system type.
    #[serde(rename = "type")]
    pub fstype: String,
    /// The disks under it.
    #[serde(default)]
    pub disk: Vec<FsDisk>,
}

/// A disk under a guest file system.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FsDisk {
    /// The bus type (`virtio`, `scsi`, ...).
    #[serde(rename = "bus-type")]
    pub bus_type: Option<String>,
    /// The disk's serial, when the guest sees one.
    pub serial: Option<String>,
    /// The guest device node.
    pub dev: Option<String>,
}

/// An `{"error": ...}` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorReply {
    /// The QMP error class.
    pub class: String,
    /// The description.
    pub desc: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Reply<T> {
    Return(T),
    Error(ErrorReply),
}

/// Decodes a reply: the `return` value, or the agent's error.
pub fn decode<T: DeserializeOwned>(reply: &str) -> Result<Result<T, ErrorReply>, serde_json::Error> {
    Ok(match serde_json::from_str::<Reply<T>>(reply)? {
        Reply::Return(v) => Ok(v),
        Reply::Error(e) => Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_asks_for_the_output_and_its_status_reads_back() {
        let json = AgentCommand::Exec { path: "/bin/sh".into(), args: vec!["-c".into(), "exit 3".into()] }.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["execute"], "guest-exec");
        assert_eq!(v["arguments"]["arg"][1], "exit 3");
        assert_eq!(v["arguments"]["capture-output"], true);
        assert_eq!(AgentCommand::ExecStatus(42).to_json(), r#"{"arguments":{"pid":42},"execute":"guest-exec-status"}"#);
        let s: ExecStatus =
            decode(r#"{"return":{"exited":true,"exitcode":3,"out-data":"bm90IHJlYWR5Cg=="}}"#).unwrap().unwrap();
        assert_eq!((s.exited, s.exitcode, s.out_data.as_deref()), (true, Some(3), Some("bm90IHJlYWR5Cg==")));
        let running: ExecStatus = decode(r#"{"return":{"exited":false}}"#).unwrap().unwrap();
        assert!(!running.exited && running.exitcode.is_none());
    }

    #[test]
    fn commands_and_replies() {
        assert_eq!(AgentCommand::Ping.to_json(), r#"{"execute":"guest-ping"}"#);
        assert_eq!(
            AgentCommand::FreezeList(vec!["/data".into()]).to_json(),
            r#"{"arguments":{"mountpoints":["/data"]},"execute":"guest-fsfreeze-freeze-list"}"#
        );
        assert_eq!(decode::<u32>(r#"{"return":2}"#).unwrap(), Ok(2));
        assert_eq!(decode::<FreezeStatus>(r#"{"return":"frozen"}"#).unwrap(), Ok(FreezeStatus::Frozen));
        let e = decode::<u32>(r#"{"error":{"class":"GenericError","desc":"busy"}}"#).unwrap().unwrap_err();
        assert_eq!(e.desc, "busy");
        let fs: Vec<FsInfo> = decode(
            r#"{"return":[{"name":"vda","mountpoint":"/data","type":"ext4","disk":[{"bus-type":"virtio","serial":"s1","dev":"/dev/vda","bus":0,"unit":0,"target":0,"pci-controller":{"domain":0,"bus":0,"slot":3,"function":0}}],"used-bytes":1}]}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(fs[0].mountpoint, "/data");
        assert_eq!(fs[0].disk[0].serial.as_deref(), Some("s1"));
        assert!(decode::<u32>("not json").is_err());
    }
}
