//! `protomesh-cni install`, the container of the `k8s/cni` DaemonSet: it
//! puts the plugin on its node, as linkerd-cni's and istio-cni's installers
//! do. It copies the plugin into the node's CNI binary directory, writes the
//! kubeconfig the plugin reads pods with (the DaemonSet's service account
//! token, written again as the kubelet rotates it), and adds the plugin to
//! the end of the node's network configuration list: the first file of the
//! configuration directory, which is the one the runtime uses. It adds it
//! again whenever the primary plugin rewrites that file. Asked to stop, it
//! takes itself out of the list, so that the node sets pods up without it
//! (their capture check then stops them from starting uncaptured).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::watch::DirWatch;

/// The plugin's name, in the list and in the binary directory.
pub const PLUGIN: &str = "protomesh-cni";
/// The kubeconfig, beside the configuration it serves.
pub const KUBECONFIG: &str = "protomesh-cni.kubeconfig";
/// How often everything is checked again, whatever the watch saw.
const RECHECK: Duration = Duration::from_secs(30);

/// Where the node's CNI lives, as the DaemonSet mounts it, and what the plugin reads the API with.
#[derive(Clone, Debug, clap::Args)]
pub struct Install {
    /// The node's CNI configuration directory (a hostPath mount).
    #[arg(long, env = "PROTOMESH_CNI_CONF_DIR", default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The node's CNI binary directory (a hostPath mount).
    #[arg(long, env = "PROTOMESH_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The configuration directory's path on the node, which the plugin sees.
    #[arg(long, env = "PROTOMESH_CNI_NODE_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub node_conf_dir: PathBuf,
    /// The service account's token and CA, as the kubelet mounts them.
    #[arg(long, env = "PROTOMESH_CNI_ACCOUNT_DIR", default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    pub account_dir: PathBuf,
    /// The API server, as pods reach it (the kubelet sets KUBERNETES_SERVICE_HOST and _PORT).
    #[arg(long, env = "PROTOMESH_CNI_API_SERVER")]
    pub api_server: Option<String>,
    /// The node's nft program, for the plugin (it runs on the node, not in this image).
    #[arg(long, env = "PROTOMESH_CNI_NFT", default_value = "nft")]
    pub nft: String,
    /// This node's name (the downward API's spec.nodeName): its pods that started without their
    /// capture rules are deleted for their controllers to make again ([`super::repair`]).
    #[arg(long, env = "PROTOMESH_CNI_NODE_NAME")]
    pub node_name: Option<String>,
}

impl Install {
    /// Installs, keeps the installation whole until `stop` resolves, then takes the plugin out of the list.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) -> Result<(), String> {
        let mut watch = DirWatch::default();
        watch.set([self.conf_dir.clone(), self.account_dir.clone()]);
        self.ensure()?;
        tracing::info!(conf_dir = %self.conf_dir.display(), "protomesh-cni installed");
        let repair =
            self.node_name.clone().map(|node| tokio::spawn(super::repair::run(node, self.conf_dir.join(KUBECONFIG))));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = watch.changed(Duration::from_millis(100)) => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
            // The account's directory is a projected volume: a rotation swaps its link.
            watch.set([self.conf_dir.clone(), self.account_dir.clone()]);
            if let Err(error) = self.ensure() {
                tracing::warn!(%error, "protomesh-cni: keeping the installation whole failed; trying again");
            }
        }
        if let Some(repair) = repair {
            repair.abort();
        }
        self.remove()
    }

    /// Puts every part in place that is not; idempotent.
    pub fn ensure(&self) -> Result<(), String> {
        let plugin = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
        let binary = std::fs::read(&plugin).map_err(|e| format!("{}: {e}", plugin.display()))?;
        write_if_changed(&self.bin_dir.join(PLUGIN), &binary, 0o755)?;
        write_if_changed(&self.conf_dir.join(KUBECONFIG), self.kubeconfig()?.as_bytes(), 0o600)?;
        let Some(primary) = primary_conf(&self.conf_dir)? else {
            // The primary plugin has not written its configuration yet: the watch sees it when it does.
            tracing::info!(conf_dir = %self.conf_dir.display(), "no network configuration yet to add protomesh-cni to");
            return Ok(());
        };
        let conf = read_json(&primary)?;
        let entry = json!({
            "type": PLUGIN,
            "kubeconfig": self.node_conf_dir.join(KUBECONFIG).display().to_string(),
            "nft": self.nft,
        });
        let chained = chained(conf, entry).map_err(|e| format!("{}: {e}", primary.display()))?;
        // A single plugin's `.conf` becomes a list in its place.
        let target = match primary.extension().and_then(|e| e.to_str()) {
            Some("conf") => primary.with_extension("conflist"),
            _ => primary.clone(),
        };
        let text = serde_json::to_string_pretty(&chained).expect("JSON serializes");
        write_if_changed(&target, text.as_bytes(), 0o644)?;
        if target != primary {
            std::fs::remove_file(&primary).map_err(|e| format!("{}: {e}", primary.display()))?;
        }
        Ok(())
    }

    /// Takes the plugin out of the node's list, leaving the rest as it was.
    pub fn remove(&self) -> Result<(), String> {
        if let Some(primary) = primary_conf(&self.conf_dir)? {
            let mut conf = read_json(&primary)?;
            if let Some(plugins) = conf["plugins"].as_array_mut() {
                plugins.retain(|plugin| plugin["type"] != PLUGIN);
                let text = serde_json::to_string_pretty(&conf).expect("JSON serializes");
                write_if_changed(&primary, text.as_bytes(), 0o644)?;
            }
        }
        let _ = std::fs::remove_file(self.conf_dir.join(KUBECONFIG));
        tracing::info!("protomesh-cni taken out of the node's network configuration");
        Ok(())
    }

    fn kubeconfig(&self) -> Result<String, String> {
        use base64::Engine;
        let read = |name: &str| {
            let path = self.account_dir.join(name);
            std::fs::read(&path)
                .map_err(|e| format!("{}: {e} (is the service account's token mounted?)", path.display()))
        };
        let (token, ca) = (read("token")?, read("ca.crt")?);
        let server = match &self.api_server {
            Some(server) => server.clone(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    "KUBERNETES_SERVICE_HOST is not set: name the API server with --api-server".to_string()
                })?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                format!("https://{host}:{port}")
            }
        };
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "local", "cluster": {
                "server": server,
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
            }}],
            "users": [{ "name": PLUGIN, "user": { "token": String::from_utf8_lossy(&token).trim() } }],
            "contexts": [{ "name": PLUGIN, "context": { "cluster": "local", "user": PLUGIN } }],
            "current-context": PLUGIN,
        });
        Ok(serde_json::to_string_pretty(&kubeconfig).expect("JSON serializes"))
    }
}

/// The configuration the runtime uses: the first file by name with a CNI
/// configuration's extension.
fn primary_conf(dir: &Path) -> Result<Option<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut confs: Vec<PathBuf> = entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| matches!(path.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
        .collect();
    confs.sort();
    Ok(confs.into_iter().next())
}

/// `conf` (a list, or a single plugin's configuration) with `entry` last in
/// its list, once.
pub fn chained(conf: Value, entry: Value) -> Result<Value, String> {
    let mut list = match conf.get("plugins") {
        Some(Value::Array(_)) => conf,
        Some(_) => return Err("`plugins` is not a list".into()),
        None if conf.get("type").is_some() => {
            let mut plugin = conf.clone();
            let plugin_object = plugin.as_object_mut().ok_or("not a JSON object")?;
            let (version, name) = (plugin_object.remove("cniVersion"), plugin_object.remove("name"));
            json!({ "cniVersion": version.unwrap_or(json!("0.3.1")), "name": name.unwrap_or(json!("k8s-pod-network")), "plugins": [plugin] })
        }
        None => return Err("neither a configuration list (`plugins`) nor a plugin's configuration (`type`)".into()),
    };
    let plugins = list["plugins"].as_array_mut().expect("checked to be a list");
    plugins.retain(|plugin| plugin["type"] != PLUGIN);
    plugins.push(entry);
    Ok(list)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))
}

/// Writes `contents` to `path` through a file renamed over it (the runtime
/// never reads half a file), unless it holds them already.
fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|held| held == contents) {
        return Ok(());
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(PLUGIN);
    let temporary = path.with_file_name(format!(".{name}.protomesh-tmp"));
    let failed = |e: std::io::Error| format!("writing {}: {e}", path.display());
    std::fs::write(&temporary, contents).map_err(failed)?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_goes_last_once_and_a_single_plugin_becomes_a_list() {
        let entry = json!({ "type": PLUGIN });
        let list =
            json!({ "cniVersion": "1.0.0", "name": "k8s", "plugins": [{ "type": "bridge" }, { "type": "portmap" }] });
        let chained_once = chained(list, entry.clone()).unwrap();
        assert_eq!(chained_once["plugins"].as_array().unwrap().last(), Some(&entry));
        let again = chained(chained_once.clone(), entry.clone()).unwrap();
        assert_eq!(again, chained_once, "adding it again changes nothing");

        let single = json!({ "cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0" });
        let listed = chained(single, entry.clone()).unwrap();
        assert_eq!(listed["cniVersion"], "0.4.0");
        assert_eq!(listed["plugins"], json!([{ "type": "bridge", "bridge": "cni0" }, entry]));
        assert!(chained(json!({ "name": "x" }), entry).unwrap_err().contains("neither"));
    }
}
