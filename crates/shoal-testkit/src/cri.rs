//! `Cri`: containerd's CRI (runtime and image services, v1) over its unix socket, driven the way
//! kubelet drives it, with a small scenario API: `run_pod`, `pull`, `create`, `start`,
//! `wait_exit`, `logs`, `remove`, `stop_pod`, `remove_pod`, `image_fs_info`.
//!
//! Pods use the host's network (no CNI) and get a log directory as kubelet makes them
//! (`LOGS/NAMESPACE_NAME_UID/CONTAINER/0.log`); [`ContainerLog`] reads the CRI log format.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1 as api;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::TestkitError;

/// A failed CRI call: which call, and what containerd answered.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// containerd answered with an error status.
    #[error("CRI {call} failed: {code:?}: {message}")]
    Rpc {
        /// The CRI method.
        call: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// containerd's message.
        message: String,
    },
    /// A wait ran out of time.
    #[error("CRI: {0}")]
    Timeout(String),
    /// A log file could not be read.
    #[error("CRI container log {path}: {error}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// What failed.
        error: String,
    },
}

impl CriError {
    fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
        move |s| CriError::Rpc {
            call,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    /// The message containerd sent, or this error's text.
    pub fn message(&self) -> String {
        match self {
            CriError::Rpc { message, .. } => message.clone(),
            e => e.to_string(),
        }
    }
}

/// Registry credentials for a pull (kubelet's image pull secret, decoded).
#[derive(Debug, Clone)]
pub struct Auth {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

/// A pod sandbox this client started.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The config it was created with (passed again to CreateContainer, as kubelet does).
    pub config: api::PodSandboxConfig,
    log_dir: PathBuf,
}

impl Pod {
    /// The pod's log directory.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }
}

/// A container this client created.
#[derive(Debug, Clone)]
pub struct Container {
    /// The container id.
    pub id: String,
    /// Its name in the pod.
    pub name: String,
    /// Its log file.
    pub log_path: PathBuf,
}

/// What a container runs: image, command, arguments, environment (CreateContainer's config).
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Image reference (`host:port/repo:tag` or `@sha256:...`).
    pub image: String,
    /// Name in the pod; a unique one is made when empty.
    pub name: String,
    /// Overrides the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Overrides the image's cmd when not empty.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory; the image's when empty.
    pub working_dir: String,
}

impl ContainerSpec {
    /// The image with its own entrypoint and cmd.
    pub fn new(image: impl Into<String>) -> ContainerSpec {
        ContainerSpec {
            image: image.into(),
            ..ContainerSpec::default()
        }
    }

    /// Sets the command (entrypoint).
    pub fn command<S: Into<String>>(mut self, c: impl IntoIterator<Item = S>) -> ContainerSpec {
        self.command = c.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the arguments (cmd).
    pub fn args<S: Into<String>>(mut self, a: impl IntoIterator<Item = S>) -> ContainerSpec {
        self.args = a.into_iter().map(Into::into).collect();
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> ContainerSpec {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Sets the container's name in its pod.
    pub fn name(mut self, n: impl Into<String>) -> ContainerSpec {
        self.name = n.into();
        self
    }
}

/// How a container ended (ContainerStatus of an exited container).
#[derive(Debug, Clone)]
pub struct Exit {
    /// Exit code.
    pub code: i32,
    /// containerd's reason ("Completed", "Error", ...).
    pub reason: String,
    /// containerd's message, if any.
    pub message: String,
    /// CreateContainer's time, ns since the epoch (containerd's clock).
    pub created_at: i64,
    /// When the process started, ns since the epoch.
    pub started_at: i64,
    /// When it exited, ns since the epoch.
    pub finished_at: i64,
}

/// A container's log, read from its CRI log file.
#[derive(Debug, Clone, Default)]
pub struct ContainerLog {
    /// Lines in order: (stream, text); partial lines already joined.
    pub lines: Vec<(Stream, String)>,
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

impl ContainerLog {
    /// Parses the CRI log format: `TIMESTAMP STREAM TAG TEXT`, tag `P` (partial) or `F` (full).
    pub fn parse(text: &str) -> Result<ContainerLog, String> {
        let mut lines = Vec::new();
        let mut partial: [String; 2] = Default::default();
        for (n, l) in text.lines().enumerate() {
            let mut f = l.splitn(4, ' ');
            let (Some(_time), Some(stream), Some(tag)) = (f.next(), f.next(), f.next()) else {
                return Err(format!("line {}: not a CRI log line: {l:?}", n + 1));
            };
            let body = f.next().unwrap_or("");
            let (s, i) = match stream {
                "stdout" => (Stream::Stdout, 0),
                "stderr" => (Stream::Stderr, 1),
                other => return Err(format!("line {}: unknown stream {other:?}", n + 1)),
            };
            partial[i].push_str(body);
            match tag.split(':').next() {
                Some("P") => {}
                Some("F") => lines.push((s, std::mem::take(&mut partial[i]))),
                _ => return Err(format!("line {}: unknown tag {tag:?}", n + 1)),
            }
        }
        Ok(ContainerLog { lines })
    }

    /// stdout's lines joined with `\n`.
    pub fn stdout(&self) -> String {
        self.stream(Stream::Stdout)
    }

    /// stderr's lines joined with `\n`.
    pub fn stderr(&self) -> String {
        self.stream(Stream::Stderr)
    }

    fn stream(&self, s: Stream) -> String {
        self.lines
            .iter()
            .filter(|(st, _)| *st == s)
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A CRI client on one containerd; see the module doc. Cheap to clone.
#[derive(Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    log_root: PathBuf,
    cgroup_parent: String,
    next: Arc<AtomicUsize>,
}

impl Cri {
    /// Connects to the CRI at `socket`; pods log under `log_root` and get `cgroup_parent`.
    pub async fn connect(
        socket: &Path,
        log_root: &Path,
        cgroup_parent: &str,
    ) -> Result<Cri, TestkitError> {
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector dials the unix socket.
        let channel = Endpoint::from_static("http://[::1]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| {
                TestkitError::Setup(format!(
                    "connecting to the CRI at {}: {e}",
                    socket.display()
                ))
            })?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            log_root: log_root.to_path_buf(),
            cgroup_parent: cgroup_parent.to_string(),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The runtime service client, for calls the scenario API does not cover.
    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The image service client.
    pub fn images(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    /// Version: runtime name and version.
    pub async fn version(&self) -> Result<api::VersionResponse, CriError> {
        let r = self
            .runtime()
            .version(api::VersionRequest::default())
            .await
            .map_err(CriError::rpc("Version"))?;
        Ok(r.into_inner())
    }

    /// Status conditions as (type, status): `RuntimeReady`, `NetworkReady`.
    pub async fn conditions(&self) -> Result<Vec<(String, bool)>, CriError> {
        let r = self
            .runtime()
            .status(api::StatusRequest { verbose: false })
            .await
            .map_err(CriError::rpc("Status"))?;
        Ok(r.into_inner()
            .status
            .map(|s| {
                s.conditions
                    .into_iter()
                    .map(|c| (c.r#type, c.status))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn unique(&self, name: &str) -> String {
        format!(
            "{name}-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// RunPodSandbox: a pod named `name` on the host's network, with its log directory.
    pub async fn run_pod(&self, name: &str) -> Result<Pod, CriError> {
        let uid = self.unique("uid");
        let log_dir = self.log_root.join(format!("default_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).map_err(|e| CriError::Log {
            path: log_dir.clone(),
            error: e.to_string(),
        })?;
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.to_string(),
                uid,
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .runtime()
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .map_err(CriError::rpc("RunPodSandbox"))?;
        Ok(Pod {
            id: r.into_inner().pod_sandbox_id,
            name: name.to_string(),
            config,
            log_dir,
        })
    }

    /// PullImage, with registry credentials when given; returns the image id containerd reports.
    pub async fn pull(&self, image: &str, auth: Option<&Auth>) -> Result<String, CriError> {
        let r = self
            .images()
            .pull_image(api::PullImageRequest {
                image: Some(image_spec(image)),
                auth: auth.map(|a| api::AuthConfig {
                    username: a.user.clone(),
                    password: a.password.clone(),
                    ..Default::default()
                }),
                sandbox_config: None,
            })
            .await
            .map_err(CriError::rpc("PullImage"))?;
        Ok(r.into_inner().image_ref)
    }

    /// ImageStatus: the image, or `None` when containerd does not have it.
    pub async fn image_status(&self, image: &str) -> Result<Option<api::Image>, CriError> {
        let r = self
            .images()
            .image_status(api::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .map_err(CriError::rpc("ImageStatus"))?;
        Ok(r.into_inner().image)
    }

    /// ListImages.
    pub async fn list_images(&self) -> Result<Vec<api::Image>, CriError> {
        let r = self
            .images()
            .list_images(api::ListImagesRequest { filter: None })
            .await
            .map_err(CriError::rpc("ListImages"))?;
        Ok(r.into_inner().images)
    }

    /// RemoveImage.
    pub async fn remove_image(&self, image: &str) -> Result<(), CriError> {
        self.images()
            .remove_image(api::RemoveImageRequest {
                image: Some(image_spec(image)),
            })
            .await
            .map_err(CriError::rpc("RemoveImage"))?;
        Ok(())
    }

    /// ImageFsInfo: the image filesystems containerd reports (kubelet's image GC reads this).
    pub async fn image_fs_info(&self) -> Result<Vec<api::FilesystemUsage>, CriError> {
        let r = self
            .images()
            .image_fs_info(api::ImageFsInfoRequest {})
            .await
            .map_err(CriError::rpc("ImageFsInfo"))?;
        Ok(r.into_inner().image_filesystems)
    }

    /// CreateContainer in `pod` (host network, its own PID namespace, as kubelet's defaults).
    pub async fn create(&self, pod: &Pod, spec: ContainerSpec) -> Result<Container, CriError> {
        let name = if spec.name.is_empty() {
            self.unique("c")
        } else {
            spec.name.clone()
        };
        let log_rel = format!("{name}/0.log");
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: Some(image_spec(&spec.image)),
            command: spec.command,
            args: spec.args,
            working_dir: spec.working_dir,
            envs: spec
                .env
                .into_iter()
                .map(|(key, value)| api::KeyValue { key, value })
                .collect(),
            log_path: log_rel.clone(),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .runtime()
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await
            .map_err(CriError::rpc("CreateContainer"))?;
        Ok(Container {
            id: r.into_inner().container_id,
            name,
            log_path: pod.log_dir.join(log_rel),
        })
    }

    /// StartContainer.
    pub async fn start(&self, c: &Container) -> Result<(), CriError> {
        self.runtime()
            .start_container(api::StartContainerRequest {
                container_id: c.id.clone(),
            })
            .await
            .map_err(CriError::rpc("StartContainer"))?;
        Ok(())
    }

    /// ContainerStatus.
    pub async fn status(&self, c: &Container) -> Result<api::ContainerStatus, CriError> {
        let r = self
            .runtime()
            .container_status(api::ContainerStatusRequest {
                container_id: c.id.clone(),
                verbose: false,
            })
            .await
            .map_err(CriError::rpc("ContainerStatus"))?;
        r.into_inner().status.ok_or_else(|| CriError::Rpc {
            call: "ContainerStatus",
            code: tonic::Code::Internal,
            message: format!("no status for container {}", c.id),
        })
    }

    /// Polls ContainerStatus (every 20 ms) until the container has exited, at most `timeout`.
    pub async fn wait_exit(&self, c: &Container, timeout: Duration) -> Result<Exit, CriError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(c).await?;
            if s.state == api::ContainerState::ContainerExited as i32 {
                return Ok(Exit {
                    code: s.exit_code,
                    reason: s.reason,
                    message: s.message,
                    created_at: s.created_at,
                    started_at: s.started_at,
                    finished_at: s.finished_at,
                });
            }
            if Instant::now() > deadline {
                return Err(CriError::Timeout(format!(
                    "container {} ({}) still {:?} after {timeout:?}",
                    c.name,
                    c.id,
                    api::ContainerState::try_from(s.state)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The container's log so far.
    pub fn logs(&self, c: &Container) -> Result<ContainerLog, CriError> {
        let err = |error: String| CriError::Log {
            path: c.log_path.clone(),
            error,
        };
        let text = std::fs::read_to_string(&c.log_path).map_err(|e| err(e.to_string()))?;
        ContainerLog::parse(&text).map_err(err)
    }

    /// Create, start, wait for the exit (at most `timeout`), and read the log.
    pub async fn run(
        &self,
        pod: &Pod,
        spec: ContainerSpec,
        timeout: Duration,
    ) -> Result<(Exit, ContainerLog), CriError> {
        let c = self.create(pod, spec).await?;
        self.start(&c).await?;
        let exit = self.wait_exit(&c, timeout).await?;
        let log = self.logs(&c)?;
        Ok((exit, log))
    }

    /// StopContainer, waiting at most `grace` before containerd kills it.
    pub async fn stop(&self, c: &Container, grace: Duration) -> Result<(), CriError> {
        self.runtime()
            .stop_container(api::StopContainerRequest {
                container_id: c.id.clone(),
                timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
            })
            .await
            .map_err(CriError::rpc("StopContainer"))?;
        Ok(())
    }

    /// RemoveContainer.
    pub async fn remove(&self, c: &Container) -> Result<(), CriError> {
        self.runtime()
            .remove_container(api::RemoveContainerRequest {
                container_id: c.id.clone(),
            })
            .await
            .map_err(CriError::rpc("RemoveContainer"))?;
        Ok(())
    }

    /// StopPodSandbox.
    pub async fn stop_pod(&self, pod: &Pod) -> Result<(), CriError> {
        self.stop_pod_id(&pod.id).await
    }

    async fn stop_pod_id(&self, id: &str) -> Result<(), CriError> {
        self.runtime()
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await
            .map_err(CriError::rpc("StopPodSandbox"))?;
        Ok(())
    }

    /// RemovePodSandbox (its containers go with it).
    pub async fn remove_pod(&self, pod: &Pod) -> Result<(), CriError> {
        self.remove_pod_id(&pod.id).await
    }

    async fn remove_pod_id(&self, id: &str) -> Result<(), CriError> {
        self.runtime()
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await
            .map_err(CriError::rpc("RemovePodSandbox"))?;
        Ok(())
    }

    /// Stops and removes every pod containerd knows; returns the errors.
    pub async fn remove_all_pods(&self) -> Vec<String> {
        let pods = match self
            .runtime()
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
        {
            Ok(r) => r.into_inner().items,
            Err(e) => return vec![CriError::rpc("ListPodSandbox")(e).to_string()],
        };
        let mut errors = Vec::new();
        for p in pods {
            if let Err(e) = self.stop_pod_id(&p.id).await {
                errors.push(e.to_string());
            }
            if let Err(e) = self.remove_pod_id(&p.id).await {
                errors.push(e.to_string());
            }
        }
        errors
    }
}

fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// Host network, a PID namespace per container, IPC per pod (kubelet's defaults with
/// `hostNetwork: true`).
fn host_network() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Node as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cri_log_lines_and_joins_partials() {
        let text = "2024-01-01T00:00:00.000000001Z stdout P hel\n\
                    2024-01-01T00:00:00.000000002Z stderr F oops\n\
                    2024-01-01T00:00:00.000000003Z stdout F lo world\n\
                    2024-01-01T00:00:00.000000004Z stdout F \n";
        let log = ContainerLog::parse(text).unwrap();
        assert_eq!(log.stdout(), "hello world\n");
        assert_eq!(log.stderr(), "oops");
        assert_eq!(log.lines.len(), 3);
    }

    #[test]
    fn refuses_what_is_not_a_cri_log() {
        assert!(ContainerLog::parse("just text\n").is_err());
        assert!(ContainerLog::parse("t stdin F x\n").is_err());
        assert!(ContainerLog::parse("t stdout X x\n").is_err());
    }
}
