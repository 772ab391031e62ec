//! Container images built here, from a static busybox: the engine on our
//! machines has no images and no registry.

use std::process::Command;
use std::sync::Mutex;

/// A busybox image whose `/www/index.html` says "hello from busybox" and whose
/// `/www/cgi-bin/whoami` answers "$GREETING from $CAPSTAN_INSTANCE_ID".
/// Run it as `httpd -f -p 8080 -h /www`.
pub const BUSYBOX_IMAGE: &str = "capstan-test/busybox:2";

static BUILD: Mutex<()> = Mutex::new(());

/// Checks that the Docker engine answers; panics with what to do if not.
pub fn require_docker() {
    crate::require_tool("docker", "apt-get install -y docker.io");
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the Docker engine does not answer (`docker version`: {}); start it with: dockerd &",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("cannot run docker: {e}"),
    }
}

/// Imports [`BUSYBOX_IMAGE`] from the host's static busybox unless present.
pub fn busybox_image() -> &'static str {
    require_docker();
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let exists = Command::new("docker")
        .args(["image", "inspect", BUSYBOX_IMAGE])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        return BUSYBOX_IMAGE;
    }
    let busybox = "/bin/busybox";
    crate::require_tool(busybox, "apt-get install -y busybox-static");
    let is_static = Command::new("file")
        .arg(busybox)
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("dynamically"));
    assert!(
        is_static.unwrap_or(true),
        "{busybox} is dynamically linked; install the static one: apt-get install -y busybox-static"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("rootfs");
    for sub in ["bin", "www/cgi-bin", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub)).expect("rootfs dir");
    }
    std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "httpd", "sleep", "echo", "cat", "nc", "wget", "kill"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet link");
    }
    std::fs::write(root.join("www/index.html"), "hello from busybox\n").expect("index");
    let whoami = root.join("www/cgi-bin/whoami");
    std::fs::write(&whoami, "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s from %s\\n' \"$GREETING\" \"$CAPSTAN_INSTANCE_ID\"\n")
        .expect("cgi script");
    std::fs::set_permissions(&whoami, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod cgi");
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .expect("passwd");
    let tar = dir.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(status.success(), "tar failed");
    let out = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENV PATH=/bin",
            "--change",
            "WORKDIR /",
        ])
        .arg(&tar)
        .arg(BUSYBOX_IMAGE)
        .output()
        .expect("run docker import");
    assert!(
        out.status.success(),
        "docker import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    BUSYBOX_IMAGE
}
